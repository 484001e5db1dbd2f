"""Canonical value tokens: values the database finds equal must share a token (or have none).

The unit tests pin the rules per dialect. The property tests store a generated batch of look-alike
values (one per row) in a real SQLite and PostgreSQL table, ask ``WHERE col = v`` for each of them, and
check that whenever the database finds a stored value equal to ``v``, the two tokens agree or one of
them is unknown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import math
import uuid
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from sqlalchemy import (
    CHAR,
    JSON,
    REAL,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Enum,
    Float,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    Numeric,
    PickleType,
    SmallInteger,
    String,
    Table,
    Text,
    Time,
    Uuid,
    bindparam,
    create_engine,
    select,
    text,
)
from sqlalchemy.dialects import mssql, mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import NullType, TypeDecorator, TypeEngine, UserDefinedType

from sqlacache.analysis.canon import NULL_TOKEN, comparable, token

SQLITE = sqlite.dialect()
PG = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
MYSQL = mysql.dialect()


class Color(enum.Enum):
    # Names and values cross over, so mixing up "stored name" and "value" shows up as a wrong match.
    RED = "green"
    GREEN = "red"
    BLUE = "blue"


class Shade(str, enum.Enum):
    # Sent as "dark" by the drivers, but f"{Shade.DARK}" is "Shade.DARK": such subclasses get no token.
    DARK = "dark"


class Level(enum.IntEnum):
    ONE = 1


def _values(cls: type[Color]) -> list[str]:
    return [m.value for m in cls]


class Lowered(TypeDecorator[str]):
    impl = String(8)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return value.lower() if isinstance(value, str) else value


class Strict(TypeDecorator[str]):
    impl = String(8)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if not isinstance(value, str):
            raise TypeError("strings only")
        return value


class NoneAsEmpty(TypeDecorator[str]):
    impl = String(8)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return "" if value is None else value


class Reversed(TypeDecorator[str]):
    impl = String(8)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        return lambda value: value[::-1]


class Shouting(String):
    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        return lambda value: value.upper()


class Point(UserDefinedType[Any]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "POINT"


def same(type_: TypeEngine[Any], dialect: Dialect, *values: Any) -> None:
    tokens = {token(type_, v, dialect) for v in values}
    assert len(tokens) == 1 and None not in tokens, dict(zip(map(repr, values), tokens))


def unknown(type_: TypeEngine[Any], dialect: Dialect, *values: Any) -> None:
    for v in values:
        assert token(type_, v, dialect) is None, v


def differ(type_: TypeEngine[Any], dialect: Dialect, a: Any, b: Any) -> None:
    ta, tb = token(type_, a, dialect), token(type_, b, dialect)
    assert ta is not None and tb is not None and ta != tb


# ---------------------------------------------------------------------------------------------------
# Format


def test_tokens_are_short_fixed_digests_that_do_not_drift_between_processes() -> None:
    # Hard-coded: the tokens are shared through Redis by processes of different versions and hash seeds.
    assert token(Integer(), 1, SQLITE) == "423410b4f9701f79"
    assert token(String(), "abc", PG) == "fc91d4dbcd124305"
    assert NULL_TOKEN == "7376b2cbfa0ad26e"
    assert token(Integer(), 1, SQLITE) == token(Integer(), 1, SQLITE)


def test_none_is_the_null_token() -> None:
    assert token(Integer(), None, SQLITE) == NULL_TOKEN
    assert token(DateTime(timezone=True), None, PG) == NULL_TOKEN


def test_kinds_do_not_collide() -> None:
    assert token(Integer(), 1, SQLITE) != token(String(), "1", SQLITE)
    assert token(Integer(), 1, SQLITE) != token(Boolean(), True, SQLITE)
    assert token(String(), "null", SQLITE) != NULL_TOKEN


# ---------------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("dialect", [SQLITE, PG, MYSQL], ids=lambda d: d.name)
def test_integers_accept_only_unambiguous_spellings(dialect: Dialect) -> None:
    same(Integer(), dialect, 1, "1", True, 1.0, Decimal("1.0"), Decimal("1E+0"))
    same(Integer(), dialect, 0, -0.0, "0", False, Decimal("-0"))
    # The database reads all of these as 1 (or rounds them to 2), so the canonical spelling is required.
    unknown(Integer(), dialect, "01", " 1", "+1", "1.0", "1e0", "1_0", "-0", 1.5, Decimal("1.5"), "x")
    # Above 2**53 an integer and a double (or MySQL's string-as-double) can be equal without being equal.
    unknown(Integer(), dialect, 2.0**53, str(2**53 + 1), math.inf, math.nan, Decimal("NaN"))
    differ(BigInteger(), dialect, 2**53, 2**53 + 1)


def test_mysql_integers_must_fit_the_column_because_non_strict_mode_clamps() -> None:
    same(SmallInteger(), SQLITE, 40000)
    unknown(SmallInteger(), MYSQL, 40000)
    same(SmallInteger(), MYSQL, 32767)
    unknown(mysql.INTEGER(unsigned=True), MYSQL, -1)
    same(mysql.INTEGER(unsigned=True), MYSQL, 2**32 - 1)
    unknown(mysql.TINYINT(), MYSQL, 128)


@pytest.mark.parametrize("dialect", [SQLITE, PG, MYSQL], ids=lambda d: d.name)
def test_doubles(dialect: Dialect) -> None:
    same(Double(), dialect, 1, 1.0, Decimal("1"), Decimal("1.000"))
    same(Double(), dialect, 0.0, -0.0, 0)
    same(Double(), dialect, 0.1, Decimal("0.1"), Decimal("0.1000000000000000000001"))
    differ(Double(), dialect, 0.1, 0.30000000000000004)
    unknown(Double(), dialect, math.nan, math.inf, Decimal("NaN"), 10**400, "1.0", True)


def test_single_precision_floats_have_no_tokens() -> None:
    for dialect in (SQLITE, PG, MYSQL):
        assert not comparable(REAL(), dialect)
        assert not comparable(Float(precision=24), dialect)
    assert comparable(Float(), PG) and comparable(Float(), SQLITE)
    assert not comparable(Float(), MYSQL)  # FLOAT is 4 bytes there
    assert comparable(Float(precision=53), MYSQL)
    assert not comparable(mysql.DOUBLE(precision=10, scale=2), MYSQL)  # rounds to the scale


@pytest.mark.parametrize("dialect", [PG, MYSQL], ids=lambda d: d.name)
def test_exact_numerics(dialect: Dialect) -> None:
    money = Numeric(10, 2)
    same(money, dialect, Decimal("1.50"), Decimal("1.5"), Decimal("1.500000"))
    same(money, dialect, Decimal("1.0"), Decimal("1"), 1, Decimal("1E+0"))
    same(money, dialect, Decimal("-0"), Decimal("0.00"), 0)
    differ(money, dialect, Decimal("1.5"), Decimal("-1.5"))
    # The database rounds 1.505 to 1.51 (or 1.50): the value as written is not the value stored.
    unknown(money, dialect, Decimal("1.505"), Decimal("123456789"), 1.5, Decimal("NaN"), Decimal("Inf"), "1")


def test_numeric_precision_and_scale_defaults() -> None:
    same(Numeric(), PG, Decimal("1.123456789"))  # unconstrained numeric
    unknown(Numeric(), MYSQL, Decimal("1.5"))  # a bare DECIMAL is DECIMAL(10, 0) on MySQL
    same(Numeric(), MYSQL, Decimal("12.000"), 12)
    unknown(Numeric(precision=5), PG, Decimal("1.5"))  # NUMERIC(5) has scale 0


def test_sqlite_binds_decimals_as_floats() -> None:
    same(Numeric(10, 2), SQLITE, Decimal("0.1"), 0.1, Decimal("0.1000000000000000000001"))
    same(Numeric(10, 2), SQLITE, Decimal("1.505"), 1.505)  # no rounding to the scale there


def test_booleans() -> None:
    for dialect in (SQLITE, PG, MYSQL):
        same(Boolean(), dialect, True, 1)
        same(Boolean(), dialect, False, 0)
        unknown(Boolean(), dialect, 2, "true", "t", 1.0, Decimal(1))


# ---------------------------------------------------------------------------------------------------
# Strings and enums


def test_strings_compare_exactly_with_default_collations() -> None:
    for dialect in (SQLITE, PG):
        differ(String(), dialect, "abc", "ABC")
        differ(String(), dialect, "abc", "abc ")
        same(String(), dialect, "1", 1)  # SQLite's TEXT affinity and PostgreSQL's ::VARCHAR cast
        unknown(String(), dialect, 1.0, True, b"abc", "a\x00b")


def test_sqlite_collations() -> None:
    nocase = String(collation="NOCASE")
    same(nocase, SQLITE, "ABC", "abc", "aBc")
    differ(nocase, SQLITE, "É", "é")  # NOCASE folds ASCII only
    same(String(collation="rtrim"), SQLITE, "ab", "ab  ")
    differ(String(collation="RTRIM"), SQLITE, "ab", " ab")
    assert not comparable(String(collation="unicode_ci"), SQLITE)


def test_postgresql_collations_and_case_insensitive_types() -> None:
    same(String(collation="C"), PG, "abc")
    assert not comparable(String(collation="und-x-icu"), PG)  # may be nondeterministic
    assert not comparable(postgresql.CITEXT(), PG)


def test_mysql_strings_need_a_binary_collation() -> None:
    assert not comparable(String(20), MYSQL)  # case- and accent-insensitive by default
    assert not comparable(String(20, collation="utf8mb4_0900_ai_ci"), MYSQL)
    binary = String(20, collation="utf8mb4_bin")
    same(binary, MYSQL, "ab", "ab   ")  # PAD SPACE
    differ(binary, MYSQL, "ab", "AB")
    unknown(binary, MYSQL, 1)  # MySQL compares a string with a number as doubles: '01' = 1
    unknown(mysql.VARCHAR(20, collation="utf8mb4_bin"), MYSQL, "x" * 21)
    unknown(Text(collation="utf8mb4_bin"), MYSQL, "é" * 40000)  # over TEXT's 65535 bytes


def test_subclasses_of_builtin_types_have_no_tokens() -> None:
    for dialect in (SQLITE, PG):
        unknown(String(), dialect, Shade.DARK)
        unknown(Integer(), dialect, Level.ONE)
        unknown(Double(), dialect, Level.ONE)


def test_padded_and_overlong_strings_have_no_tokens() -> None:
    for dialect in (SQLITE, PG, MYSQL):
        assert not comparable(CHAR(5), dialect)
    # PostgreSQL stores "ab   " into VARCHAR(3) as "ab ": cut, not refused.
    unknown(String(3), PG, "ab   ")
    same(String(3), PG, "ab ")


def test_enums_token_what_is_stored() -> None:
    by_name = Enum(Color)
    by_value = Enum(Color, values_callable=_values)
    for dialect in (SQLITE, PG):
        same(by_name, dialect, Color.RED, "RED")
        same(by_value, dialect, Color.RED, "green")
        differ(by_value, dialect, Color.RED, "red")  # "red" is GREEN's stored value
        unknown(by_name, dialect, "green", "purple", "Red", 1, [1])
    assert not comparable(by_name, MYSQL)  # compared with the column's case-insensitive collation
    same(mysql.ENUM(Color, collation="utf8mb4_bin"), MYSQL, Color.BLUE, "BLUE")


def test_enum_member_and_its_string_share_the_string_token() -> None:
    assert token(Enum(Color), Color.RED, PG) == token(String(), "RED", PG)


# ---------------------------------------------------------------------------------------------------
# Dates and times

UTC = dt.timezone.utc
PLUS_2 = dt.timezone(dt.timedelta(hours=2))


def test_sqlite_datetimes_keep_the_wall_clock_and_drop_the_zone() -> None:
    for type_ in (DateTime(), DateTime(timezone=True)):
        wall = dt.datetime(2024, 5, 1, 12, 30, 0, 5)
        same(type_, SQLITE, wall, wall.replace(tzinfo=UTC), wall.replace(tzinfo=PLUS_2))
        differ(type_, SQLITE, wall.replace(tzinfo=PLUS_2), wall.replace(tzinfo=PLUS_2).astimezone(UTC))
        unknown(type_, SQLITE, wall.date(), wall.isoformat(), wall.timestamp())
    assert not comparable(sqlite.DATETIME(truncate_microseconds=True), SQLITE)  # type: ignore[no-untyped-call]


def test_postgresql_timestamptz_compares_instants() -> None:
    instant = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    same(
        DateTime(timezone=True),
        PG,
        instant,
        instant.astimezone(PLUS_2),
        instant.astimezone(ZoneInfo("America/Caracas")),
    )
    differ(DateTime(timezone=True), PG, instant, instant + dt.timedelta(microseconds=1))
    # A naive value is read in the session's time zone.
    unknown(DateTime(timezone=True), PG, instant.replace(tzinfo=None), instant.date())


def test_postgresql_timestamp_without_zone() -> None:
    naive = dt.datetime(2024, 5, 1, 12, 0, 0, 123456)
    same(DateTime(), PG, naive)
    differ(DateTime(), PG, naive, naive.replace(microsecond=0))
    unknown(DateTime(), PG, naive.replace(tzinfo=UTC))  # cast through the session's time zone
    unknown(postgresql.TIMESTAMP(precision=3), PG, naive)  # rounded to milliseconds
    same(postgresql.TIMESTAMP(precision=3), PG, naive.replace(microsecond=0))


def test_mysql_datetimes_need_whole_seconds_and_no_zone() -> None:
    same(DateTime(), MYSQL, dt.datetime(2024, 5, 1, 12))
    unknown(DateTime(), MYSQL, dt.datetime(2024, 5, 1, 12, 0, 0, 1), dt.datetime(2024, 5, 1, tzinfo=UTC))
    assert not comparable(mysql.TIMESTAMP(), MYSQL)
    assert not comparable(DateTime(timezone=True), MYSQL)


def test_dates_and_times() -> None:
    day = dt.date(2024, 2, 29)
    for dialect in (SQLITE, PG, MYSQL):
        same(Date(), dialect, day)
        differ(Date(), dialect, day, dt.date(2024, 3, 1))
        unknown(Date(), dialect, dt.datetime(2024, 2, 29), "2024-02-29")
        same(Time(), dialect, dt.time(12, 30))
        unknown(Time(), dialect, dt.time(12, 30, tzinfo=UTC), "12:30")
    same(Time(), PG, dt.time(12, 30, 0, 1))
    unknown(Time(), MYSQL, dt.time(12, 30, 0, 1))
    assert not comparable(Time(timezone=True), PG)


# ---------------------------------------------------------------------------------------------------
# Uuids and bytes

SOME_UUID = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")


def test_uuid_strings_only_on_native_postgresql_uuids() -> None:
    same(
        Uuid(),
        PG,
        SOME_UUID,
        str(SOME_UUID),
        SOME_UUID.hex.upper(),
        f"{{{SOME_UUID}}}",
        "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
    )
    unknown(Uuid(), PG, SOME_UUID.urn, f" {SOME_UUID}", SOME_UUID.int)
    for dialect in (SQLITE, MYSQL):
        same(Uuid(), dialect, SOME_UUID)
        unknown(Uuid(), dialect, str(SOME_UUID), SOME_UUID.hex)
    unknown(Uuid(native_uuid=False), PG, str(SOME_UUID))


def test_binaries() -> None:
    for dialect in (SQLITE, PG, MYSQL):
        same(LargeBinary(), dialect, b"ab", bytearray(b"ab"), memoryview(b"ab"))
        differ(LargeBinary(), dialect, b"ab", b"ab\x00")
        unknown(LargeBinary(), dialect, "ab")


# ---------------------------------------------------------------------------------------------------
# Decorators, variants and what is never comparable


def test_type_decorators_are_followed_through_process_bind_param() -> None:
    same(Lowered(), SQLITE, "ABC", "abc", "aBc")
    unknown(Strict(), SQLITE, 1)  # SQLAlchemy could not send it
    assert token(Strict(), None, SQLITE) == NULL_TOKEN  # only a left-out column stores NULL
    # A None attribute may be stored as "" or, when the column is left out, as NULL.
    unknown(NoneAsEmpty(), SQLITE, None)
    same(NoneAsEmpty(), SQLITE, "")


def test_variants_follow_the_dialect() -> None:
    type_ = String().with_variant(String(collation="NOCASE"), "sqlite")
    same(type_, SQLITE, "A", "a")
    differ(type_, PG, "A", "a")


NEVER: list[TypeEngine[Any]] = [
    JSON(),
    postgresql.JSONB(),
    postgresql.ARRAY(Integer()),
    Interval(),
    PickleType(),
    NullType(),
    Point(),
    Reversed(),  # its own bind_processor hides what is sent
    Shouting(),  # a String subclass that processes values itself
    CHAR(3),
    String(collation="nondeterministic_ci"),
]
SAMPLES: list[Any] = [
    None,
    1,
    "a",
    1.5,
    Decimal(1),
    True,
    b"a",
    [1],
    {"a": 1},
    dt.timedelta(1),
    dt.datetime(2024, 1, 1),
    SOME_UUID,
]


@pytest.mark.parametrize("type_", NEVER, ids=repr)
@pytest.mark.parametrize("dialect", [SQLITE, PG, MYSQL], ids=lambda d: d.name)
def test_not_comparable_means_no_tokens_at_all(type_: TypeEngine[Any], dialect: Dialect) -> None:
    assert not comparable(type_, dialect)
    unknown(type_, dialect, *SAMPLES)


def test_other_dialects_are_not_understood() -> None:
    assert not comparable(Integer(), mssql.dialect())  # type: ignore[no-untyped-call]
    assert token(Integer(), 1, mssql.dialect()) is None  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------------------------------
# Properties against the real databases

SEEDED_UUIDS = [SOME_UUID, uuid.UUID(int=0), uuid.UUID("00000000-0000-4000-8000-00000000000a")]
ZONES: st.SearchStrategy[dt.tzinfo | None] = st.one_of(
    st.none(),
    st.timezones(),
    st.sampled_from(
        [
            UTC,
            PLUS_2,
            dt.timezone(-dt.timedelta(hours=3, seconds=7)),
            dt.timezone(dt.timedelta(microseconds=1)),
        ]
    ),
)
DECIMALS = st.builds(
    lambda n, places: Decimal(n).scaleb(-places), st.integers(-1100, 1100), st.integers(0, 4)
)

INTS = st.one_of(
    st.integers(-2, 2),
    st.integers(-2, 2).map(str),
    st.integers(-2, 2).map(Decimal),
    st.sampled_from([True, False, Level.ONE]),
    st.sampled_from(["01", " 1", "+1", "-0", "1.0", "1e0", "1_0", "\u0661", "x", "", str(2**53 + 1)]),
    st.sampled_from([2**53, 2**53 + 1, 2**63 - 1, 2**63, Decimal("1.0"), Decimal("1.5"), Decimal("NaN")]),
    st.sampled_from([1.0, -0.0, 0.5, 1.5, 2.5, 2.0**53, 2.0**53 + 2, math.inf, math.nan]),
)
# Small pools of look-alikes, so that independent draws are often equal in the database.
NUMBERS = st.one_of(
    st.sampled_from([0, -0.0, 0.0, Decimal("-0"), Decimal("0.00"), 1, 1.0, True, Decimal("1.000"), "1.5"]),
    st.sampled_from(
        [0.1, Decimal("0.1"), Decimal("0.1000000000000000000001"), Decimal("1.005"), Decimal("1.01")]
    ),
    st.sampled_from([2**53 + 1, 2.0**53, Decimal(2**53 + 1), 10**20, Decimal("99999999.995"), 2**1100]),
    st.sampled_from([math.nan, math.inf, Decimal("NaN"), Decimal("sNaN"), Decimal("-Infinity")]),
    DECIMALS,
    DECIMALS.map(float),
    st.floats(),
)
BOOLS = st.sampled_from([True, False, 0, 1, 2, -1, "t", "true", "1", 1.0, Decimal(1)])
STRINGS = st.one_of(
    st.text(alphabet="aAzZ éÉß\x00\t1", max_size=5),
    st.text(alphabet="aA ", max_size=3).map(lambda s: s + "  "),  # PostgreSQL cuts these to fit VARCHAR(3)
    st.integers(-2, 12),
    st.sampled_from([1.0, 0.5, True, Decimal("1.0"), b"a", Shade.DARK, "dark"]),
)
ENUMS = st.sampled_from([*Color, "RED", "GREEN", "BLUE", "red", "green", "blue", "Red", "purple", "RED "])
DATETIMES = st.one_of(
    st.datetimes(dt.datetime(1, 1, 2), dt.datetime(9999, 12, 30), timezones=ZONES),  # type: ignore[arg-type]
    st.builds(
        lambda base, zone: base.replace(tzinfo=zone),
        st.sampled_from(
            [dt.datetime(2024, 3, 31, 1, 30), dt.datetime(2000, 1, 1), dt.datetime(1970, 1, 1, 0, 0, 1)]
        ),
        ZONES,
    ),
    st.dates(min_value=dt.date(1, 1, 2)),
)
DATES = st.one_of(st.dates(), st.datetimes(), st.sampled_from(["2024-02-29", dt.date(2024, 2, 29)]))
TIMES = st.one_of(
    st.times(timezones=st.one_of(st.none(), st.sampled_from([UTC, PLUS_2]))),
    st.sampled_from([dt.time(0, 0), dt.time(12, 30), "12:30:00"]),
)
UUIDS = st.sampled_from(SEEDED_UUIDS)  # their string spellings come in as look-alikes
BINARIES = st.one_of(st.binary(max_size=3), st.text(alphabet="ab\x00", max_size=2))


def _neighbours(a: Any) -> list[Any]:
    """Values the database may well find equal to ``a``."""
    candidates: list[Callable[[], Any]] = [lambda: a]
    if isinstance(a, enum.Enum):
        candidates += [lambda: a.name, lambda: a.value, lambda: a.name.lower()]
    elif isinstance(a, (int, float, Decimal)):
        candidates += [
            lambda: int(a),
            lambda: float(a),
            lambda: -float(a),  # -0.0 for 0
            lambda: Decimal(a),
            lambda: Decimal(repr(a)) if isinstance(a, float) else Decimal(a).normalize(),
            lambda: Decimal(a).quantize(Decimal("0.01"), ROUND_HALF_UP),
            lambda: Decimal(a).quantize(Decimal("0.0001")),
            lambda: int(Decimal(a).quantize(Decimal(1), ROUND_HALF_UP)),  # how PostgreSQL casts numeric
            lambda: round(a),  # and float8
            lambda: str(a),
            lambda: str(int(a)),
            lambda: a == 1,
        ]
    elif isinstance(a, str):
        candidates += [a.upper, a.lower, lambda: a + " ", lambda: a + "   ", a.rstrip, lambda: a[:3]]
    elif isinstance(a, dt.datetime):
        candidates += [
            lambda: a.replace(tzinfo=None),
            lambda: a.replace(tzinfo=UTC),
            lambda: a.replace(microsecond=0),
            lambda: a + dt.timedelta(microseconds=1),
            lambda: a.replace(fold=1 - a.fold),
            a.date,
            a.isoformat,
        ]
        if a.utcoffset() is not None:
            candidates += [lambda: a.astimezone(UTC), lambda: a.astimezone(ZoneInfo("Asia/Kathmandu"))]
    elif isinstance(a, dt.date):
        candidates += [lambda: dt.datetime.combine(a, dt.time()), a.isoformat]
    elif isinstance(a, dt.time):
        candidates += [lambda: a.replace(tzinfo=None), lambda: a.replace(microsecond=0), a.isoformat]
    elif isinstance(a, uuid.UUID):
        candidates += [
            lambda: str(a),
            lambda: a.hex,
            lambda: a.hex.upper(),
            lambda: f"{{{a}}}",
            lambda: a.urn,
            lambda: "-".join(a.hex[i : i + 4] for i in range(0, 32, 4)),
        ]
    elif isinstance(a, bytes):
        candidates += [
            lambda: bytearray(a),
            lambda: memoryview(a),
            lambda: a.decode("latin-1"),
            lambda: a + b" ",
        ]
    out = []
    for make in candidates:
        with contextlib.suppress(ArithmeticError, ValueError, TypeError):
            out.append(make())
    return out


def _batches(values: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A few values, each followed by some of its look-alikes."""

    def cluster(a: Any, picks: list[int]) -> list[Any]:
        alike = _neighbours(a)
        return [a, *(alike[i % len(alike)] for i in picks)]

    clusters = st.builds(cluster, values, st.lists(st.integers(0, 63), max_size=3))
    return st.lists(clusters, min_size=1, max_size=3).map(lambda cs: [v for c in cs for v in c])


def _columns(dialect_name: str) -> dict[str, tuple[TypeEngine[Any], st.SearchStrategy[Any]]]:
    columns: dict[str, tuple[TypeEngine[Any], st.SearchStrategy[Any]]] = {
        "int": (Integer(), INTS),
        "bigint": (BigInteger(), INTS),
        "float": (Float(), NUMBERS),
        "money": (Numeric(10, 2), NUMBERS),
        "numeric": (Numeric(), NUMBERS),
        "flag": (Boolean(), BOOLS),
        "short": (String(3), STRINGS),
        "body": (Text(), STRINGS),
        "lowered": (Lowered(), STRINGS),
        "color": (Enum(Color, name="canon_color"), ENUMS),
        "color_value": (Enum(Color, name="canon_color_value", values_callable=_values), ENUMS),
        "at": (DateTime(), DATETIMES),
        "at_tz": (DateTime(timezone=True), DATETIMES),
        "day": (Date(), DATES),
        "clock": (Time(), TIMES),
        "uuid": (Uuid(), UUIDS),
        "uuid_text": (Uuid(as_uuid=False), UUIDS),
        "blob": (LargeBinary(), BINARIES),
    }
    if dialect_name == "sqlite":
        columns["nocase"] = (String(8, collation="NOCASE"), STRINGS)
        columns["rtrim"] = (String(8, collation="RTRIM"), STRINGS)
    else:
        columns["bytewise"] = (String(8, collation="C"), STRINGS)
    return {name: (type_, _batches(values)) for name, (type_, values) in columns.items()}


SQLITE_COLUMNS = _columns("sqlite")
PG_COLUMNS = _columns("postgresql")


def _table(columns: dict[str, tuple[TypeEngine[Any], st.SearchStrategy[Any]]]) -> Table:
    return Table(
        "canon",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        *(Column(name, type_) for name, (type_, _) in columns.items()),
    )


Database = tuple[Connection, Table]


@pytest.fixture(scope="module")
def sqlite_db() -> Iterator[Database]:
    engine = create_engine("sqlite://")
    table = _table(SQLITE_COLUMNS)
    table.metadata.create_all(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn, table
    engine.dispose()


@pytest.fixture(scope="module")
def pg_db(pg_sync_url: str) -> Iterator[Database]:
    schema = f"sqlacache_canon_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    # Nothing is kept, so the many small commits need not wait for the disk.
    options = f"-csearch_path={schema} -csynchronous_commit=off"
    engine = create_engine(pg_sync_url, connect_args={"options": options})
    try:
        table = _table(PG_COLUMNS)
        table.metadata.create_all(engine)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn, table
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def db_matches(db: Database, name: str, values: list[Any]) -> list[tuple[Any, Any]]:
    """Store each value in its own row, then ask ``WHERE col = v`` for each: the (stored, v) pairs found.

    A value the driver, SQLAlchemy or the database refuses is left out. The connection autocommits, so a
    refused statement leaves nothing behind to roll back.
    """
    conn, table = db
    column = table.c[name]
    query = select(table.c.id).where(column == bindparam("b", type_=column.type))
    stored: dict[int, Any] = {}
    found: list[tuple[Any, Any]] = []
    try:
        for i, value in enumerate(values):
            with contextlib.suppress(Exception):
                conn.execute(table.insert(), {"id": i, name: value})
                stored[i] = value
        for value in values:
            with contextlib.suppress(Exception):
                found += [(stored[i], value) for i in conn.execute(query, {"b": value}).scalars()]
    finally:
        conn.execute(table.delete())
    return found


def check_batch(db: Database, name: str, values: list[Any]) -> None:
    type_, dialect = db[1].c[name].type, db[0].dialect
    for a, b in db_matches(db, name, values):
        ta, tb = token(type_, a, dialect), token(type_, b, dialect)
        note_event(f"equal in the database, {'both' if ta and tb else 'not both'} tokens")
        assert ta is None or tb is None or ta == tb, f"the database finds {a!r} = {b!r}, tokens {ta} != {tb}"


PROPERTY = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", list(SQLITE_COLUMNS))
@PROPERTY
@given(data=st.data())
def test_sqlite_equal_values_share_tokens(sqlite_db: Database, name: str, data: st.DataObject) -> None:
    check_batch(sqlite_db, name, data.draw(SQLITE_COLUMNS[name][1], label="values"))


@pytest.mark.postgres
@pytest.mark.parametrize("name", list(PG_COLUMNS))
@PROPERTY
@given(data=st.data())
def test_postgresql_equal_values_share_tokens(pg_db: Database, name: str, data: st.DataObject) -> None:
    check_batch(pg_db, name, data.draw(PG_COLUMNS[name][1], label="values"))


# The harness itself: the database finds these equal, so the properties above are not vacuous.


@pytest.mark.parametrize(("columns", "dialect"), [(SQLITE_COLUMNS, SQLITE), (PG_COLUMNS, PG)])
def test_property_columns_get_tokens(columns: dict[str, Any], dialect: Dialect) -> None:
    assert all(comparable(type_, dialect) for type_, _ in columns.values())


KNOWN_EQUAL = [
    ("int", 1, "1"),
    ("short", "ab   ", "ab "),
    ("at_tz", dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 1, 2, tzinfo=PLUS_2)),
    ("money", Decimal("1.005"), Decimal("1.01")),
    ("color", Color.RED, "RED"),
    ("uuid", SOME_UUID, str(SOME_UUID).upper()),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("name", "a", "b"), KNOWN_EQUAL)
def test_postgresql_harness_sees_equal_values(pg_db: Database, name: str, a: Any, b: Any) -> None:
    # object() is refused by the driver; that must not spoil the rest of the batch.
    assert (a, b) in db_matches(pg_db, name, [a, object(), b])
    assert _row_count(pg_db) == 0


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("int", 1, "01"),
        ("nocase", "ABC", "abc"),
        ("at", dt.datetime(2024, 1, 1, tzinfo=PLUS_2), dt.datetime(2024, 1, 1)),
        ("numeric", Decimal("0.1000000000000000000001"), 0.1),
    ],
)
def test_sqlite_harness_sees_equal_values(sqlite_db: Database, name: str, a: Any, b: Any) -> None:
    assert (a, b) in db_matches(sqlite_db, name, [a, object(), b])
    assert _row_count(sqlite_db) == 0


def _row_count(db: Database) -> int:
    conn, table = db
    return len(conn.execute(select(table.c.id)).all())
