"""Exactness, injectivity and robustness of the column value codec, in isolation and against real drivers."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import math
import struct
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.types import TypeEngine

from sqlacache.analysis import codec as codec_module
from sqlacache.analysis.codec import CodecError, ValueCodec, codec_for

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


SQLITE_DATETIME: TypeEngine[Any] = sqlite.DATETIME()  # type: ignore[no-untyped-call]


class Mood(enum.Enum):
    happy = "h"
    sad = "s"
    glad = "h"  # an alias: it must come back as the canonical member
    meh = 3


# ---------------------------------------------------------------------------------------------------
# Exactness helpers


def tz_identity(tz: tzinfo | None) -> Any:
    if tz is None:
        return None
    if type(tz) is ZoneInfo:
        return ("zoneinfo", tz.key)
    if type(tz) is timezone:
        return ("timezone", tz.utcoffset(None), tz.tzname(None))
    return ("other", repr(tz))


def exact(v: Any) -> Any:
    """A hashable fingerprint that differs whenever two values are distinguishable at all."""
    t = type(v)
    if t is float:
        return ("float", struct.pack("<d", v))
    if t is Decimal:
        return ("Decimal", str(v))
    if t is datetime or t is time:
        return (t.__name__, v.isoformat(), v.fold, tz_identity(v.tzinfo), v.utcoffset())
    if t is list or t is tuple:
        return (t.__name__, tuple(exact(x) for x in v))
    if t is dict:
        return ("dict", tuple((exact(k), exact(x)) for k, x in v.items()))
    if isinstance(v, enum.Enum):
        return ("enum", t, v.name)
    if isinstance(v, uuid.UUID):
        return (t.__module__, t.__qualname__, v.int)
    return (t.__module__, t.__qualname__, v)


def payload(c: ValueCodec, v: Any) -> bytes:
    encoded = c.encode(v)
    # The cache wraps each value in a row and a result; the encoding must leave room for that.
    orjson.dumps([[[encoded]]])
    return orjson.dumps(encoded)


def roundtrip(c: ValueCodec, v: Any) -> Any:
    return c.decode(orjson.loads(payload(c, v)))


def assert_roundtrip(type_: TypeEngine[Any], v: Any) -> Any:
    c = codec_for(type_)
    back = roundtrip(c, v)
    assert type(back) is type(v)
    assert exact(back) == exact(v)
    if (type(v) is float and not math.isnan(v)) or (type(v) is Decimal and not v.is_nan()):
        assert back == v
    return back


def is_escaped(encoded: Any) -> bool:
    """Whether a typed codec fell back to the tagged form (the value's type did not match the column)."""
    return type(encoded) is dict and list(encoded) == ["!"]


# ---------------------------------------------------------------------------------------------------
# Strategies

any_bits_floats = st.integers(0, 2**64 - 1).map(lambda n: struct.unpack("<d", n.to_bytes(8, "little"))[0])
floats = st.one_of(
    st.floats(),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324, 1.7976931348623157e308]),
    any_bits_floats,
)
ints = st.one_of(
    st.integers(),
    st.integers(-(2**64) - 5, 2**64 + 5),
    st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
    st.integers(-(2**400), 2**400),
)
decimals = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(places=4, allow_nan=False, allow_infinity=False),
    st.from_regex(r"-?[0-9]{1,40}(\.[0-9]{0,12})?([eE][+-]?[0-9]{1,4})?", fullmatch=True).map(Decimal),
    st.sampled_from(["0", "-0", "0.000", "-0.0001", "1E+2", "sNaN", "-NaN", "-Infinity"]).map(Decimal),
)
offsets = st.one_of(
    st.sampled_from([timedelta(0), timedelta(hours=5, minutes=45), timedelta(hours=-3, minutes=-30)]),
    # Offsets strictly between -1 s and +1 s (other than 0) are refused: CPython's fromisoformat()
    # reads "+00:00:00.000001" back as UTC. Databases only produce whole-second offsets anyway.
    st.timedeltas(
        min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
    ).filter(lambda off: not timedelta(seconds=-1) < off < timedelta(seconds=1) or not off),
)
fixed_tzs = st.one_of(st.just(timezone.utc), offsets.map(timezone))
zones = st.timezones()
times = st.times(timezones=st.one_of(st.none(), fixed_tzs)).map(lambda t: t.replace(fold=0))
datetimes_raw = st.datetimes(timezones=st.one_of(st.none(), fixed_tzs, zones))
# fold=1 is only storable where it changes the offset; the codec refuses it elsewhere (see below).
datetimes = datetimes_raw.map(
    lambda d: d if d.fold == 0 or d.replace(fold=0).utcoffset() != d.utcoffset() else d.replace(fold=0)
)
tricky_text = st.sampled_from(
    ["", "!", "[", "(", "i", "n", "dt", "nan", "inf", "-inf", "0x10", "2024-01-01", "12:00:00", "null", "{}"]
)
texts = st.one_of(st.text(), tricky_text)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    texts,
    st.binary(),
    decimals,
    st.dates(),
    times,
    datetimes,
    st.timedeltas(),
    st.uuids(),
)
generic_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), tricky_text), inner, max_size=4),
    ),
    max_leaves=10,
)
# A tiny alphabet of look-alikes so that lists of these collide often: the injectivity test needs
# equal-looking but different values side by side.
lookalikes = st.recursive(
    st.sampled_from(
        [
            None,
            0,
            1,
            True,
            False,
            0.0,
            -0.0,
            1.0,
            "1",
            "",
            "[",
            "(",
            "!",
            "i",
            "0x1",
            "d",
            "2024-01-01",
            Decimal("1"),
            Decimal("1.0"),
            Decimal("NaN"),
            math.nan,
            "nan",
            b"",
            b"1",
            date(2024, 1, 1),
            datetime(2024, 1, 1),
            datetime(2024, 1, 1, tzinfo=timezone.utc),
            datetime(2024, 1, 1, tzinfo=ZoneInfo("UTC")),
            time(0),
            time(0, tzinfo=timezone.utc),
            timedelta(0),
            timedelta(microseconds=1),
            uuid.UUID(int=1),
            "00000000000000000000000000000001",
            2**64,
            "0x10000000000000000",
        ]
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["!", "[", "a"]), inner, max_size=2),
    ),
    max_leaves=4,
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_docs = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), tricky_text), inner, max_size=4),
    ),
    max_leaves=12,
)
# What Python's json module may hand back for a JSON column: also big ints and NaN/Infinity.
json_values = st.recursive(
    st.one_of(json_scalars, ints, st.sampled_from([math.nan, math.inf, -math.inf])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), tricky_text), inner, max_size=4),
    ),
    max_leaves=12,
)
# Arbitrary orjson.loads output, salted with tag-like strings and escape-like objects.
tag_strings = st.sampled_from(["[", "(", "i", "f", "b", "n", "d", "t", "dt", "td", "u", "!", "x", ""])
loads_output = st.recursive(
    st.one_of(
        json_scalars,
        tag_strings,
        st.from_regex(r"nan:[0-9a-f]{16}|0x[0-9a-f]{1,30}|\S{0,40}\[[A-Za-z/_.]{0,20}\]"),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(tag_strings, inner).map(list),
        st.tuples(st.integers(-1, 20), inner).map(list),
        st.dictionaries(st.one_of(st.just("!"), st.text(max_size=3)), inner, max_size=3),
        inner.map(lambda x: {"!": x}),
    ),
    max_leaves=8,
)


def with_none(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), s)


def arrays(
    item: st.SearchStrategy[Any], container: Callable[[list[Any]], Any] = list
) -> st.SearchStrategy[Any]:
    return st.recursive(
        with_none(item), lambda inner: st.lists(inner, max_size=4).map(container), max_leaves=10
    ).filter(lambda v: type(v) is (tuple if container is tuple else list))


def rectangular(item: st.SearchStrategy[Any], dims: int) -> st.SearchStrategy[Any]:
    s = st.lists(with_none(item), max_size=3)
    for _ in range(dims - 1):
        s = st.lists(s, max_size=3)
    return s


class Upper(sa.types.TypeDecorator[str]):
    impl = sa.String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.upper()


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class PointType(sa.types.TypeDecorator[Point]):
    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else f"{value.x},{value.y}"

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        x, y = value.split(",")
        return Point(int(x), int(y))


TYPED_CASES: list[tuple[TypeEngine[Any], st.SearchStrategy[Any]]] = [
    (sa.Integer(), ints),
    (sa.SmallInteger(), ints),
    (sa.BigInteger(), ints),
    (mysql.INTEGER(), ints),
    (sa.Boolean(), st.booleans()),
    (sa.Float(), floats),
    (sa.Double(), floats),
    (sa.REAL(), floats),
    (postgresql.DOUBLE_PRECISION(), floats),
    (sa.Numeric(asdecimal=False), floats),
    (sa.Numeric(), decimals),
    (sa.Numeric(12, 4), decimals),
    (sa.Float(asdecimal=True), decimals),
    (sa.String(), texts),
    (sa.Text(), texts),
    (sa.Unicode(), texts),
    (sa.UnicodeText(), texts),
    (sa.CHAR(3), texts),
    (sa.VARCHAR(), texts),
    (sa.Enum("a", "b"), st.sampled_from(["a", "b"])),
    (sa.LargeBinary(), st.binary()),
    (sa.BINARY(), st.binary()),
    (sa.VARBINARY(), st.binary()),
    (postgresql.BYTEA(), st.binary()),
    (sa.Date(), st.dates()),
    (sa.Time(), times),
    (sa.Time(timezone=True), times),
    (sa.DateTime(), datetimes),
    (sa.DateTime(timezone=True), datetimes),
    (postgresql.TIMESTAMP(timezone=True), datetimes),
    (SQLITE_DATETIME, datetimes),
    (sa.Interval(), st.timedeltas()),
    (postgresql.INTERVAL(), st.timedeltas()),
    (sa.Uuid(), st.uuids()),
    (sa.UUID(), st.uuids()),
    (postgresql.UUID(), st.uuids()),
    (sa.Uuid(as_uuid=False), st.uuids().map(str)),
    (sa.Enum(Mood), st.sampled_from(Mood)),
    (postgresql.ENUM(Mood, name="mood"), st.sampled_from(Mood)),
    (sa.JSON(), json_values),
    (postgresql.JSON(), json_docs),
    (postgresql.JSONB(), json_values),
    (postgresql.ARRAY(sa.Integer()), arrays(ints)),
    (sa.ARRAY(sa.Integer(), as_tuple=True), arrays(ints, tuple)),
    (postgresql.ARRAY(sa.String(), dimensions=2), rectangular(texts, 2)),
    (postgresql.ARRAY(sa.Numeric()), arrays(decimals)),
    (postgresql.ARRAY(sa.DateTime(timezone=True)), arrays(datetimes)),
    (postgresql.ARRAY(postgresql.JSONB()), st.lists(with_none(json_values), max_size=4)),
    (postgresql.ARRAY(postgresql.JSONB(), dimensions=2), rectangular(json_values, 2)),
    (postgresql.ARRAY(Upper()), rectangular(generic_values, 2)),
    (sa.PickleType(), generic_values),
    (sa.types.NullType(), generic_values),
    (Upper(), generic_values),
    (postgresql.INET(), generic_values),
]
ALL_TYPES = [t for t, _ in TYPED_CASES]


def case_id(case: tuple[TypeEngine[Any], Any]) -> str:
    return repr(case[0])


# ---------------------------------------------------------------------------------------------------
# Round trips per type


@pytest.mark.parametrize(("type_", "values"), TYPED_CASES, ids=[case_id(c) for c in TYPED_CASES])
def test_typed_roundtrip(type_: TypeEngine[Any], values: st.SearchStrategy[Any]) -> None:
    @FAST
    @given(with_none(values))
    def check(v: Any) -> None:
        assert_roundtrip(type_, v)

    check()


@pytest.mark.parametrize(
    ("type_", "value", "expected"),
    [
        (sa.Integer(), 5, b"5"),
        (mysql.BIGINT(), 2**64 - 1, b"18446744073709551615"),
        (sa.BigInteger(), -(2**63) - 1, b'"-0x8000000000000001"'),
        (sa.Boolean(), False, b"false"),
        (sa.Float(), -0.0, b"-0.0"),
        (sa.Float(), math.nan, b'"nan"'),
        (sa.Float(), -math.inf, b'"-inf"'),
        (mysql.DOUBLE(asdecimal=False), 0.1, b"0.1"),
        (sa.Numeric(), Decimal("1.2300"), b'"1.2300"'),
        (sa.Numeric(asdecimal=False), 1.5, b"1.5"),
        (sa.Float(asdecimal=True), Decimal("1.5"), b'"1.5"'),
        (sa.Text(), "x", b'"x"'),
        (sa.Enum("a", "b"), "a", b'"a"'),
        (sa.LargeBinary(), b"\x00\xff", b'"AP8="'),
        (sa.Date(), date(2024, 2, 29), b'"2024-02-29"'),
        (sa.Time(), time(1, 2, 3, 4), b'"01:02:03.000004"'),
        (
            sa.Time(timezone=True),
            time(1, 2, tzinfo=timezone(timedelta(hours=5, minutes=45))),
            b'"01:02:00+05:45"',
        ),
        (SQLITE_DATETIME, datetime(2024, 1, 1, 12), b'"2024-01-01T12:00:00"'),
        (
            postgresql.TIMESTAMP(timezone=True),
            datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
            b'"2024-01-01T12:00:00-03:30"',
        ),
        (
            sa.DateTime(timezone=True),
            datetime(2024, 1, 1, 12, tzinfo=ZoneInfo("Asia/Kathmandu")),
            b'"2024-01-01T12:00:00+05:45[Asia/Kathmandu]"',
        ),
        (sa.Interval(), timedelta(days=-1, microseconds=1), b"-86399999999"),
        (postgresql.INTERVAL(), timedelta(seconds=1), b"1000000"),
        (sa.Uuid(), uuid.UUID(int=255), b'"000000000000000000000000000000ff"'),
        (sa.Uuid(as_uuid=False), "0000-x", b'"0000-x"'),
        (sa.Enum(Mood), Mood.glad, b'"happy"'),
        (postgresql.JSONB(), {"a": [1, None]}, b'{"a":[1,null]}'),
        (sa.JSON(), {"!": 1}, b'{"!":{"!":1}}'),
        (sa.JSON(), [2**64], b'{"!":["[",["i","0x10000000000000000"]]}'),
        (postgresql.ARRAY(sa.Integer()), [[1, None], [2**64, 3]], b'[[1,null],["0x10000000000000000",3]]'),
        (postgresql.ARRAY(postgresql.JSONB()), [[1], [2]], b"[2,[[1],[2]]]"),
        (postgresql.ARRAY(postgresql.JSONB(), dimensions=1), [[1], {"a": 2}], b'[[1],{"a":2}]'),
        (sa.PickleType(), (1, [b"x"]), b'["(",1,["[",["b","eA=="]]]'),
        (sa.Integer(), Decimal("9223372036854775807"), b'{"!":["n","9223372036854775807"]}'),
        (sa.Integer(), True, b'{"!":true}'),
        (sa.Float(), 1, b'{"!":1}'),
        (sa.String(), 5, b'{"!":5}'),
    ],
    ids=repr,
)
def test_wire_format(type_: TypeEngine[Any], value: Any, expected: bytes) -> None:
    """Dialect-specific subclasses land on the right codec, and the payload is the compact form."""
    assert payload(codec_for(type_), value) == expected
    assert_roundtrip(type_, value)


@THOROUGH
@given(datetimes_raw)
def test_datetime_fold_and_zones(v: datetime) -> None:
    c = codec_for(sa.DateTime(timezone=True))
    fold_is_invisible = v.fold == 1 and v.replace(fold=0).utcoffset() == v.utcoffset()
    if fold_is_invisible:
        with pytest.raises(CodecError):
            c.encode(v)
        return
    back = assert_roundtrip(sa.DateTime(timezone=True), v)
    assert back.utcoffset() == v.utcoffset()
    assert back.fold == v.fold
    if v.tzinfo is not None:
        assert back.tzname() == v.tzname()


def test_datetime_exactness_examples() -> None:
    london = ZoneInfo("Europe/London")
    for v in [
        datetime(2023, 10, 29, 1, 30, tzinfo=london),
        datetime(2023, 10, 29, 1, 30, fold=1, tzinfo=london),
        datetime(2023, 3, 26, 1, 30, tzinfo=london),  # does not exist: kept as given
        datetime(2023, 3, 26, 1, 30, fold=1, tzinfo=london),
        datetime.min.replace(tzinfo=ZoneInfo("Asia/Kathmandu")),
        datetime.max.replace(tzinfo=ZoneInfo("Pacific/Kiritimati")),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59, seconds=59, microseconds=1))),
        datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    ]:
        back = assert_roundtrip(sa.DateTime(), v)
        assert (back.utcoffset(), back.fold, back.tzinfo) == (v.utcoffset(), v.fold, v.tzinfo)

    # Not reproducible exactly: a named fixed offset, a keyless or foreign tzinfo, an invisible fold.
    class Foreign(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta:
            return timedelta(hours=1)

        def dst(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

        def tzname(self, dt: datetime | None) -> str:
            return "FOREIGN"

    with open("/usr/share/zoneinfo/UTC", "rb") as f:
        keyless = ZoneInfo.from_file(f)
    for bad in [
        datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1), "CET")),
        datetime(2024, 1, 1, tzinfo=Foreign()),
        datetime(2024, 1, 1, tzinfo=keyless),
        datetime(2024, 1, 1, fold=1),
        datetime(2024, 6, 1, fold=1, tzinfo=london),
        time(1, fold=1),
        time(1, tzinfo=timezone(timedelta(microseconds=1))),
        datetime(2024, 1, 1, tzinfo=timezone(-timedelta(microseconds=999_999))),
        time(1, tzinfo=ZoneInfo("UTC")),
    ]:
        for type_ in (sa.DateTime(), sa.Time(), sa.PickleType()):
            with pytest.raises(CodecError):
                codec_for(type_).encode(bad)


def test_float_bits_and_decimal_exponents() -> None:
    weird_nan = struct.unpack("<d", bytes.fromhex("0100000000f8ff7f"))[0]
    for v in [math.nan, -math.nan, weird_nan, -0.0, 0.0, math.inf, -math.inf, 5e-324]:
        for type_ in (sa.Float(), sa.PickleType(), sa.ARRAY(sa.Float())):
            value = [v] if isinstance(type_, sa.ARRAY) else v
            back = roundtrip(codec_for(type_), value)
            back = back[0] if isinstance(type_, sa.ARRAY) else back
            assert struct.pack("<d", back) == struct.pack("<d", v)
            assert math.copysign(1.0, back) == math.copysign(1.0, v)
            assert math.isnan(back) == math.isnan(v)
    for text in [
        "1.2300",
        "-0.000",
        "1E+5",
        "1e-30",
        "NaN",
        "-sNaN",
        "Infinity",
        "123456789012345678901234567890.5",
    ]:
        for decimal_type in (sa.Numeric(), sa.PickleType()):
            assert str(roundtrip(codec_for(decimal_type), Decimal(text))) == str(Decimal(text))


def test_big_values() -> None:
    for v in [2**64, -(2**63) - 1, 7**5000, -(10**10000)]:  # beyond str()'s default digit limit too
        assert_roundtrip(sa.BigInteger(), v)
        assert_roundtrip(sa.PickleType(), v)
        assert_roundtrip(sa.JSON(), {"n": v})
    for td in [timedelta.max, timedelta.min, timedelta(microseconds=-1)]:
        assert_roundtrip(sa.Interval(), td)
        assert_roundtrip(sa.PickleType(), td)


# ---------------------------------------------------------------------------------------------------
# Any column type, any supported value: exact or refused, never wrong


@THOROUGH
@given(st.sampled_from(ALL_TYPES), generic_values)
def test_any_value_in_any_column_roundtrips(type_: TypeEngine[Any], v: Any) -> None:
    """Values of the 'wrong' Python type (SQLite, sum() of a BigInteger...) still come back exactly."""
    assert_roundtrip(type_, v)


@THOROUGH
@given(generic_values)
def test_generic_roundtrip(v: Any) -> None:
    assert_roundtrip(sa.PickleType(), v)


@THOROUGH
@given(
    st.sampled_from([sa.PickleType(), sa.Integer(), sa.JSON(), sa.ARRAY(sa.JSON())]),
    st.lists(lookalikes, min_size=2, max_size=8),
)
def test_injective(type_: TypeEngine[Any], values: list[Any]) -> None:
    c = codec_for(type_)
    by_payload: dict[bytes, Any] = {}
    by_value: dict[Any, bytes] = {}
    for v in values:
        if isinstance(type_, sa.ARRAY) and type(v) is not list:
            v = [v]
        p = payload(c, v)
        fingerprint = exact(v)
        assert by_payload.setdefault(p, fingerprint) == fingerprint, (p, v)
        assert by_value.setdefault(fingerprint, p) == p
        assert exact(c.decode(orjson.loads(p))) == fingerprint


def test_lookalikes_are_distinct() -> None:
    c = codec_for(sa.PickleType())
    groups: list[list[Any]] = [
        [1, True, 1.0, "1", Decimal("1"), [1], (1,), {"1": 1}],
        ["2024-01-01", date(2024, 1, 1), datetime(2024, 1, 1), ["d", "2024-01-01"], ("d", "2024-01-01")],
        [["[", 1], ("[", 1), ["(", 1], [["[", 1]]],
        [math.nan, "nan", ["f", "nan"], Decimal("NaN")],
        [2**64, "0x10000000000000000", ["i", "0x10000000000000000"]],
        [b"", "", [], (), {}, None, ["b", ""]],
        [{"!": 1}, {"!": [1]}, {"!": ["[", 1]}],
        [0.0, -0.0, 0, False, Decimal("0"), Decimal("-0"), Decimal("0.0")],
        [timedelta(microseconds=1), 1, ["td", 1]],
        [uuid.UUID(int=1), "00000000000000000000000000000001"],
    ]
    for group in groups:
        payloads = [payload(c, v) for v in group]
        assert len(set(payloads)) == len(group), payloads
        for v, p in zip(group, payloads):
            assert exact(c.decode(orjson.loads(p))) == exact(v)
    # A str column never turns into anything else, even when the text looks like an encoding.
    for text in ["2024-01-01", '{"!": 1}', "0x10", "nan", "[1]"]:
        assert_roundtrip(sa.String(), text)


# ---------------------------------------------------------------------------------------------------
# Refusals at encode


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        (sa.PickleType(), object()),
        (sa.PickleType(), {1, 2}),
        (sa.PickleType(), frozenset()),
        (sa.PickleType(), bytearray(b"x")),
        (sa.PickleType(), {1: "non-str key"}),
        (sa.PickleType(), Mood.happy),
        (sa.PickleType(), Point(1, 2)),
        (sa.PickleType(), type("S", (str,), {})("subclass")),
        (sa.PickleType(), [object()]),
        (sa.PickleType(), "lone \ud800 surrogate"),
        (sa.PickleType(), {"\udfff": 1}),
        (sa.JSON(), {"a": ["\ud800"]}),
        (sa.JSON(), {"\ud800": 1}),
        (sa.Integer(), object()),
        (sa.String(), Point(1, 2)),
        (PointType(), Point(1, 2)),
        (sa.JSON(), {"a": {1, 2}}),
        (sa.JSON(), {1: "x"}),
        (sa.ARRAY(sa.Integer()), [object()]),
        (sa.Uuid(), type("U", (uuid.UUID,), {})(int=1)),
    ],
    ids=repr,
)
def test_encode_refuses(type_: TypeEngine[Any], value: Any) -> None:
    with pytest.raises(CodecError):
        codec_for(type_).encode(value)


def test_encode_refuses_deep_and_cyclic() -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    cyclic_dict: dict[str, Any] = {}
    cyclic_dict["a"] = cyclic_dict
    for type_ in (sa.PickleType(), sa.JSON(), sa.ARRAY(sa.Integer()), sa.ARRAY(sa.JSON()), sa.Integer()):
        for v in (deep, cyclic, cyclic_dict):
            with pytest.raises(CodecError):
                codec_for(type_).encode(v)
    # Moderately deep documents are fine and stay well inside orjson's nesting limit.
    doc: Any = 1
    for _ in range(60):
        doc = {"a": [doc]}
    assert_roundtrip(sa.JSON(), doc)


# ---------------------------------------------------------------------------------------------------
# Strict decoding


@pytest.mark.parametrize(
    ("type_", "bad"),
    [
        (sa.Integer(), "abc"),
        (sa.Integer(), 1.5),
        (sa.Integer(), True),
        (sa.Integer(), []),
        (sa.Integer(), {"!": ["zz", 1]}),
        (sa.Integer(), {"!": 1, "x": 2}),
        (sa.Integer(), {"x": 1}),
        (sa.Boolean(), 1),
        (sa.Boolean(), "true"),
        (sa.Float(), 1),
        (sa.Float(), "NaN"),
        (sa.Float(), "nan:zz00000000000000"),
        (sa.Float(), "nan:0000000000000000"),
        (sa.Numeric(), "abc"),
        (sa.Numeric(), 1.5),
        (sa.String(), 1),
        (sa.String(), ["a"]),
        (sa.LargeBinary(), "!!!"),
        (sa.LargeBinary(), "a"),
        (sa.LargeBinary(), "é"),
        (sa.Date(), "2024-13-01"),
        (sa.Date(), 20240101),
        (sa.Time(), "25:00"),
        (sa.DateTime(), "yesterday"),
        (sa.DateTime(), "2024-01-01T00:00:00[Europe/Paris]"),
        (sa.DateTime(), "2024-01-01T00:00:00+09:00[Europe/Paris]"),
        (sa.DateTime(), "2024-01-01T00:00:00+01:00[No/Such_Zone]"),
        (sa.DateTime(), "2024-01-01T00:00:00+01:00[../../../etc/passwd]"),
        (sa.DateTime(), "2024-01-01T00:00:00+01:00[/etc/passwd]"),
        (sa.DateTime(), "2024-01-01T00:00:00+01:00[Europe]"),
        (sa.DateTime(), "2024-01-01T00:00:00+01:00]"),
        (sa.DateTime(), "]"),
        (sa.Interval(), 1.5),
        (sa.Interval(), "zz"),
        (sa.Interval(), "0x" + "f" * 40),
        (sa.Uuid(), "abc"),
        (sa.Uuid(), "g" * 32),
        (sa.Uuid(), "-" + "0" * 31),
        (sa.Uuid(), "x" * 36),
        (sa.Uuid(), 5),
        (sa.Enum(Mood), "nope"),
        (sa.Enum(Mood), "__class__"),
        (sa.Enum(Mood), 1),
        (sa.ARRAY(sa.Integer()), "x"),
        (sa.ARRAY(sa.Integer()), [1, "abc"]),
        (sa.ARRAY(sa.JSON()), [1]),
        (sa.ARRAY(sa.JSON()), [0, []]),
        (sa.ARRAY(sa.JSON()), [17, []]),
        (sa.ARRAY(sa.JSON()), [2, [1]]),
        (sa.ARRAY(sa.JSON(), dimensions=2), [[1], 2]),
        (sa.PickleType(), []),
        (sa.PickleType(), ["zz", 1]),
        (sa.PickleType(), [1, 2]),
        (sa.PickleType(), ["i", 5]),
        (sa.PickleType(), ["n"]),
        (sa.PickleType(), ["n", "1", "2"]),
        (sa.PickleType(), ["d", "x"]),
        (sa.PickleType(), ["td", 1.5]),
        (sa.PickleType(), ["u", 7]),
        (sa.PickleType(), {"a": ["b", "***"]}),
        (sa.PickleType(), ["[", ["(", ["dt", "nope"]]]),
        (sa.PickleType(), [["[", 1]]),
    ],
    ids=repr,
)
def test_decode_rejects(type_: TypeEngine[Any], bad: Any) -> None:
    with pytest.raises(CodecError):
        codec_for(type_).decode(bad)


@pytest.mark.parametrize(
    "type_", [sa.PickleType(), sa.Integer(), sa.ARRAY(sa.Integer()), sa.ARRAY(sa.JSON()), sa.JSON()]
)
def test_decode_deep_payload(type_: TypeEngine[Any]) -> None:
    depth = 1000  # orjson.loads accepts up to 1024 levels: more than Python's recursion limit
    for raw in (
        b"[" * depth + b"]" * depth,
        b'{"!":' * depth + b"1" + b"}" * depth,
        b'["[",' * depth + b"1" + b"]" * depth,
    ):
        with contextlib.suppress(CodecError):
            codec_for(type_).decode(orjson.loads(raw))


@THOROUGH
@given(st.sampled_from(ALL_TYPES), loads_output)
def test_decode_fuzz(type_: TypeEngine[Any], x: Any) -> None:
    """Any JSON at all decodes to a value or raises CodecError, and decoded values are stable."""
    c = codec_for(type_)
    try:
        v = c.decode(x)
    except CodecError:
        return
    assert exact(roundtrip(c, v)) == exact(v)


@FAST
@given(st.sampled_from(ALL_TYPES), st.from_type(object).filter(lambda o: not isinstance(o, type)))
def test_encode_fuzz(type_: TypeEngine[Any], v: Any) -> None:
    """Arbitrary Python objects: an exact round trip or CodecError, nothing else."""
    c = codec_for(type_)
    try:
        encoded = c.encode(v)
    except CodecError:
        return
    back = c.decode(orjson.loads(orjson.dumps(encoded)))
    assert exact(back) == exact(v)


# ---------------------------------------------------------------------------------------------------
# Memoization


def test_codec_for_is_memoized_and_forgets_dead_types() -> None:
    t = sa.Numeric(10, 2)
    assert codec_for(t) is codec_for(t)
    assert codec_for(sa.Integer()).encode is codec_for(sa.BigInteger()).encode
    gc.collect()
    before = len(codec_module._memo)
    for _ in range(200):
        codec_for(sa.ARRAY(sa.Enum(Mood)))
        codec_for(sa.String(10))
    gc.collect()
    assert len(codec_module._memo) <= before + 2
    # A codec must not keep its own type alive, or the weak memo would never let go of it.
    e = sa.ARRAY(sa.Enum(Mood))
    key, alive = id(e), weakref.ref(e)
    codec_for(e)
    assert key in codec_module._memo
    del e
    gc.collect()
    assert alive() is None
    assert key not in codec_module._memo


def test_enum_codec_uses_its_own_class() -> None:
    class Other(enum.Enum):
        happy = "h"

    c = codec_for(sa.Enum(Mood))
    assert c.decode("happy") is Mood.happy
    assert c.decode(orjson.loads(orjson.dumps(c.encode(Mood.meh)))) is Mood.meh
    with pytest.raises(CodecError):
        c.encode(Other.happy)
    assert codec_for(sa.Enum(Other)).decode("happy") is Other.happy


def test_asyncpg_uuid_keeps_its_class() -> None:
    pgproto = pytest.importorskip("asyncpg.pgproto.pgproto")
    v = pgproto.UUID("12345678-1234-5678-1234-567812345678")
    for type_ in (sa.Uuid(), sa.PickleType(), sa.ARRAY(sa.Uuid())):
        value = [v] if isinstance(type_, sa.ARRAY) else v
        back = roundtrip(codec_for(type_), value)
        back = back[0] if isinstance(type_, sa.ARRAY) else back
        assert type(back) is pgproto.UUID
        assert back == v


# ---------------------------------------------------------------------------------------------------
# Real databases: round trip exactly what driver + SQLAlchemy return


def _pg_columns(suffix: str) -> list[tuple[str, TypeEngine[Any], list[Any]]]:
    kathmandu = timezone(timedelta(hours=5, minutes=45))
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    return [
        ("small", sa.SmallInteger(), [-32768, 32767, 0, 1]),
        ("i", sa.Integer(), [-(2**31), 2**31 - 1, 0, 7]),
        ("big", sa.BigInteger(), [-(2**63), 2**63 - 1, 0, 1]),
        ("flag", sa.Boolean(), [True, False, True, False]),
        ("f", sa.Float(), [math.nan, -0.0, 5e-324, math.inf]),
        ("dbl", sa.Double(), [-math.inf, 1.7976931348623157e308, 0.1, -1.5]),
        ("re", sa.REAL(), [1.5, -0.0, math.nan, 3.4028234663852886e38]),
        (
            "num",
            sa.NUMERIC(12, 4),
            [Decimal("12345678.1234"), Decimal("-0.0001"), Decimal("0"), Decimal("NaN")],
        ),
        ("numf", sa.Numeric(12, 4, asdecimal=False), [1.5, -2.25, 0.0, 1e-4]),
        (
            "numx",
            sa.Numeric(),
            [
                Decimal("1e-30"),
                Decimal("123456789012345678901234567890.5"),
                Decimal("-0.000"),
                Decimal("Infinity"),
            ],
        ),
        ("s", sa.String(50), ["", "héllo ☃", "2024-01-01", "x" * 50]),
        ("txt", sa.Text(), ["multi\nline\ttab", "\x01", '{"!": 1}', "null"]),
        ("ch", sa.CHAR(3), ["ab", "abc", "", "x"]),
        ("bin", sa.LargeBinary(), [b"", b"\x00\xff" * 10, bytes(range(256)), b"x"]),
        ("d", sa.Date(), [date(1, 1, 1), date(9999, 12, 31), date(2024, 2, 29), date(1970, 1, 1)]),
        ("t", sa.Time(), [time(0), time(23, 59, 59, 999999), time(12, 30, 1, 5), time(1, 2)]),
        (
            "ttz",
            sa.Time(timezone=True),
            [
                time(1, 2, 3, 4, tzinfo=kathmandu),
                time(23, 0, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
                time(0, tzinfo=timezone.utc),
                time(12, tzinfo=timezone(timedelta(hours=14))),
            ],
        ),
        (
            "dt",
            sa.DateTime(),
            [
                datetime(1, 1, 1),
                datetime(9999, 12, 31, 23, 59, 59, 999999),
                datetime(2024, 2, 29, 12, 0, 0, 1),
                datetime(2000, 1, 1),
            ],
        ),
        (
            "dttz",
            sa.DateTime(timezone=True),
            [
                datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=kathmandu),
                datetime(2023, 10, 29, 0, 30, tzinfo=timezone.utc),  # London: 01:30 BST
                datetime(2023, 10, 29, 1, 30, tzinfo=timezone.utc),  # London: 01:30 GMT, fold=1
                datetime(1900, 1, 1, tzinfo=timezone.utc),  # Kathmandu's LMT: +05:41:16
            ],
        ),
        (
            "iv",
            sa.Interval(),
            [
                timedelta(0),
                timedelta(days=-5, seconds=3, microseconds=7),
                timedelta(days=999_999_999, seconds=86399, microseconds=999999),
                timedelta(microseconds=-1),
            ],
        ),
        (
            "pgiv",
            postgresql.INTERVAL(),
            [timedelta(hours=1), timedelta(days=-1), timedelta(microseconds=1), timedelta(0)],
        ),
        ("u", sa.Uuid(), [u1, uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), u2]),
        ("ustr", sa.Uuid(as_uuid=False), [str(u1), str(u2), str(uuid.UUID(int=0)), str(u1)]),
        ("pgu", postgresql.UUID(), [u2, u1, u1, uuid.UUID(int=5)]),
        ("mood", sa.Enum(Mood, name=f"codec_mood_{suffix}"), [Mood.happy, Mood.sad, Mood.meh, Mood.glad]),
        ("label", sa.Enum("a", "b c", name=f"codec_label_{suffix}"), ["a", "b c", "a", "b c"]),
        ("js", sa.JSON(), [{"a": [1, 2.5, None, True, "x"]}, "just a string", 2**70, {"!": [1]}]),
        ("jsb", postgresql.JSONB(), [{"big": 123456789012345678901234567890, "f": 0.1}, [], {"!": 1}, 1.5]),
        ("ai", postgresql.ARRAY(sa.Integer()), [[], [1, None, 3], [2**31 - 1], [-1]]),
        (
            "as2",
            postgresql.ARRAY(sa.String(), dimensions=2),
            [[["a", "b"], ["c", None]], [], [["x"]], [["", "{}"]]],
        ),
        ("at", postgresql.ARRAY(sa.Integer(), as_tuple=True), [(1, 2), (), (None,), (5,)]),
        (
            "anum",
            postgresql.ARRAY(sa.Numeric(10, 2)),
            [[Decimal("1.50"), None], [], [Decimal("-0.01")], [Decimal("99999999.99")]],
        ),
        ("ajb", postgresql.ARRAY(postgresql.JSONB()), [[{"a": 1}, {"b": [1]}], [], [[1, 2], [3, 4]], ["x"]]),
        (
            "adt",
            postgresql.ARRAY(sa.DateTime(timezone=True)),
            [[datetime(2024, 1, 1, tzinfo=kathmandu)], [], [None], []],
        ),
        ("pick", sa.PickleType(), [{"a": 1}, (1, "x", [b"y"]), Decimal("1.5"), date(2024, 1, 1)]),
        ("upper", Upper(50), ["abc", "ß", "", "x"]),
        ("point", PointType(20), [Point(1, 2), Point(-1, 0), Point(3, 3), Point(0, 0)]),
    ]


# Columns whose values legitimately need the escape form (JSON big ints, an escape-shaped document);
# anything else escaping means the type dispatch does not match what the driver returns.
PG_EXPECTED_ESCAPES = {"js", "jsb"}
# Columns holding values this codec refuses: a custom class from a TypeDecorator.
PG_EXPECTED_REFUSALS = {"point"}


def _make_table(
    columns: list[tuple[str, TypeEngine[Any], list[Any]]], name: str
) -> tuple[sa.MetaData, sa.Table]:
    metadata = sa.MetaData()
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        *(sa.Column(col, type_) for col, type_, _ in columns),
    )
    return metadata, table


def _rows(columns: list[tuple[str, TypeEngine[Any], list[Any]]]) -> list[dict[str, Any]]:
    n = len(columns[0][2])
    rows = [{"id": 0, **{col: None for col, _, _ in columns}}]
    rows += [{"id": i + 1, **{col: values[i] for col, _, values in columns}} for i in range(n)]
    return rows


def _check_result(
    stmt: sa.Select[Any], rows: Sequence[Any], expected_escapes: set[str], expected_refusals: set[str]
) -> None:
    escaped: set[str] = set()
    refused: set[str] = set()
    assert rows
    for row in rows:
        for column, value in zip(stmt.selected_columns, row):
            c = codec_for(column.type)
            try:
                encoded = c.encode(value)
            except CodecError:
                refused.add(column.name)
                continue
            # For the generic codec a {"!": ...} dict is just a dict, not a fallback.
            if is_escaped(encoded) and not isinstance(column.type, (sa.PickleType, Upper)):
                escaped.add(column.name)
            back = c.decode(orjson.loads(orjson.dumps(encoded)))
            assert type(back) is type(value), column.name
            assert exact(back) == exact(value), column.name
            if isinstance(value, (datetime, time)):
                assert back.utcoffset() == value.utcoffset()
    assert escaped == expected_escapes
    assert refused == expected_refusals


def _aggregate_stmt(table: sa.Table) -> sa.Select[Any]:
    return sa.select(
        sa.func.sum(table.c.big).label("sum_big"),  # typed BigInteger, returned as Decimal by PostgreSQL
        sa.func.count().label("n"),
        sa.func.max(table.c.dttz).label("max_dttz"),
        sa.func.avg(table.c.i).label("avg_i"),  # NullType: generic codec
    )


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.mark.postgres
def test_postgres_psycopg_roundtrip(pg_sync_url: str, suffix: str) -> None:
    columns = _pg_columns(suffix)
    metadata, table = _make_table(columns, f"codec_rt_{suffix}")
    engine = sa.create_engine(pg_sync_url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), _rows(columns))
        for zone in ("Asia/Kathmandu", "Europe/London", "UTC"):
            with engine.connect() as conn:
                conn.exec_driver_sql(f"SET TIME ZONE '{zone}'")
                stmt = sa.select(table).order_by(table.c.id)
                rows = conn.execute(stmt).all()
                assert rows[0].dttz is None
                if zone != "UTC":
                    assert type(rows[1].dttz.tzinfo) is ZoneInfo  # psycopg's choice: must survive as such
                if zone == "Europe/London":
                    assert (rows[2].dttz.fold, rows[3].dttz.fold) == (0, 1)
                _check_result(stmt, rows, PG_EXPECTED_ESCAPES, PG_EXPECTED_REFUSALS)
                agg = _aggregate_stmt(table)
                _check_result(agg, conn.execute(agg).all(), {"sum_big"}, set())
    finally:
        metadata.drop_all(engine)
        engine.dispose()


@pytest.mark.postgres
async def test_postgres_asyncpg_roundtrip(pg_async_url: str, suffix: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    columns = _pg_columns(suffix)
    metadata, table = _make_table(columns, f"codec_rt_{suffix}")
    engine = create_async_engine(pg_async_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(table.insert(), _rows(columns))
        async with engine.connect() as conn:
            stmt = sa.select(table).order_by(table.c.id)
            rows = (await conn.execute(stmt)).all()
            # The types asyncpg returns differently from psycopg, which the codec must keep as they are.
            assert type(rows[1].u).__module__ == "asyncpg.pgproto.pgproto"
            assert rows[1].dttz.tzinfo is timezone.utc
            _check_result(stmt, rows, PG_EXPECTED_ESCAPES, PG_EXPECTED_REFUSALS)
            agg = _aggregate_stmt(table)
            _check_result(agg, (await conn.execute(agg)).all(), {"sum_big"}, set())
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
        await engine.dispose()


def test_sqlite_roundtrip(tmp_path: Path) -> None:
    columns: list[tuple[str, TypeEngine[Any], list[Any]]] = [
        ("i", sa.Integer(), [-(2**63), 2**63 - 1, 0, 5]),
        ("big", sa.BigInteger(), [1, 2, 3, 4]),
        ("flag", sa.Boolean(), [True, False, True, False]),
        ("f", sa.Float(), [-0.0, math.inf, 0.1, 5e-324]),
        (
            "num",
            sa.Numeric(10, 4),
            [Decimal("1.5"), Decimal("-0.0001"), Decimal("0"), Decimal("123456.1234")],
        ),
        ("numf", sa.Numeric(10, 4, asdecimal=False), [1.5, 2, 0.25, -3]),
        ("s", sa.String(20), ["", "héllo", "2024-01-01", "x"]),
        ("bin", sa.LargeBinary(), [b"", b"\x00\xff", bytes(range(256)), b"x"]),
        ("d", sa.Date(), [date(1, 1, 1), date(9999, 12, 31), date(2024, 2, 29), date(1970, 1, 1)]),
        ("t", sa.Time(), [time(0), time(23, 59, 59, 999999), time(12, 30, 1, 5), time(1, 2)]),
        (
            "dt",
            sa.DateTime(),
            [
                datetime(1, 1, 1),
                datetime(9999, 12, 31, 23, 59, 59, 999999),
                datetime(2024, 2, 29, 12, 0, 0, 1),
                datetime(2000, 1, 1),
            ],
        ),
        (
            "dttz",
            sa.DateTime(timezone=True),
            [datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=45)))] * 4,
        ),
        (
            "iv",
            sa.Interval(),
            [
                timedelta(0),
                timedelta(days=-5, seconds=3, microseconds=7),
                timedelta(days=9999),
                timedelta(microseconds=-1),
            ],
        ),
        ("u", sa.Uuid(), [uuid.uuid4(), uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4()]),
        ("ustr", sa.Uuid(as_uuid=False), [str(uuid.uuid4()) for _ in range(4)]),
        ("mood", sa.Enum(Mood), [Mood.happy, Mood.sad, Mood.meh, Mood.glad]),
        ("js", sa.JSON(), [{"a": [1, 2.5, None]}, [], "s", 2**70]),
        ("pick", sa.PickleType(), [{"a": 1}, (1, "x"), Decimal("1.5"), [date(2024, 1, 1)]]),
        ("upper", Upper(10), ["abc", "ß", "", "x"]),
    ]
    metadata, table = _make_table(columns, "codec_rt")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'codec.sqlite'}")
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), _rows(columns))
            # SQLite's dynamic typing: values of another type in typed columns.
            conn.exec_driver_sql("INSERT INTO codec_rt (id, i, f, s, big) VALUES (99, 'abc', 7, 12, 1.5)")
        with engine.connect() as conn:
            stmt = sa.select(table).order_by(table.c.id)
            rows = conn.execute(stmt).all()
            # REAL and TEXT affinity convert 7 and 12; the JSON column's NUMERIC affinity turns 2**70 into a
            # float before SQLAlchemy sees it. What is left: 'abc' in i, 1.5 in big, ints in numf.
            _check_result(stmt, rows, {"i", "big", "numf"}, set())
            agg = sa.select(
                sa.func.sum(table.c.numf), sa.func.max(table.c.dt), sa.func.count(), sa.func.avg(table.c.f)
            )
            _check_result(agg, conn.execute(agg).all(), set(), set())
    finally:
        engine.dispose()
