"""PostgreSQL's network, MAC, money and range types: served from the cache exactly as each driver
(psycopg 3 and asyncpg, which differ) returns them from the real database."""

from __future__ import annotations

import ipaddress
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, select
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession
from sqlacache.analysis.codec import CodecError, codec_for


class Base(DeclarativeBase):
    pass


class Host(Base):
    __tablename__ = "sqlacache_pgtypes_host"
    id: Mapped[int] = mapped_column(primary_key=True)
    inet = mapped_column(pg.INET)
    cidr = mapped_column(pg.CIDR)
    mac = mapped_column(pg.MACADDR)
    mac8 = mapped_column(pg.MACADDR8)
    price = mapped_column(pg.MONEY)
    ints = mapped_column(pg.INT4RANGE)
    bigs = mapped_column(pg.INT8RANGE)
    nums = mapped_column(pg.NUMRANGE)
    days = mapped_column(pg.DATERANGE)
    stamps = mapped_column(pg.TSRANGE)
    zoned = mapped_column(pg.TSTZRANGE)
    multi = mapped_column(pg.INT4MULTIRANGE)
    addrs = mapped_column(pg.ARRAY(pg.INET))


COLUMNS = [c.key for c in Host.__table__.columns]

ROWS = [
    "(1, '10.0.0.1/24', '10.0.0.0/24', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', '12.34',"
    " '[1,5)', '[-9000000000,9000000000]', '(1.50,2.5]', '[2020-01-01,2020-02-01)',"
    " '[2020-01-01 10:00:00.000001, 2020-01-02)', '[2020-01-01 00:00+02, 2021-06-01 12:30+00)',"
    " '{[1,3), [5,7)}', '{192.168.0.1, ::1/64}')",
    "(2, '::1', '2001:db8::/32', null, null, '-0.01', 'empty', null, '(,)', null, null,"
    " '(,2021-01-01 00:00+00]', '{}', '{}')",
    "(3, '192.168.1.7', '0.0.0.0/0', null, null, null, null, null, null, null, null, null, null, null)",
]


def exact(v: Any) -> Any:
    """A fingerprint that differs whenever two values are distinguishable (type, zone, exponent)."""
    t = type(v)
    if isinstance(v, pg.Range):
        return (t, exact(v.lower), exact(v.upper), v.bounds, v.empty)
    if isinstance(v, list):
        return (t, tuple(exact(x) for x in v))
    if isinstance(v, datetime):
        tz = v.tzinfo
        return (t, v.isoformat(), type(tz), getattr(tz, "key", None) or repr(tz))
    if isinstance(v, Decimal):
        return (t, str(v))
    return (t, v)


def fingerprint(hosts: list[Host]) -> list[Any]:
    return [[exact(getattr(h, c)) for c in COLUMNS] for h in hosts]


@pytest.fixture
def pg_hosts(pg_sync_url: str) -> Any:
    engine = sa.create_engine(pg_sync_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {Host.__tablename__} VALUES " + ", ".join(ROWS)))
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def _counting(engine: Any) -> list[str]:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt))
    return seen


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_psycopg_rows_come_back_from_the_cache_exactly(pg_hosts, backend, redis_url, key_prefix):
    cache = Cache(backend="memory://" if backend == "memory" else redis_url, prefix=key_prefix)
    seen = _counting(pg_hosts)
    Session = sessionmaker(pg_hosts, class_=CachingSession, cache=cache)
    stmt = select(Host).order_by(Host.id)
    columns = select(*Host.__table__.columns).order_by(Host.id)
    reads = []
    for _ in range(2):
        with Session() as s:
            reads.append(
                (fingerprint(list(s.scalars(stmt))), [[exact(v) for v in r] for r in s.execute(columns)])
            )
    assert len(seen) == 2, "the second round must come from the cache"
    assert reads[0] == reads[1]
    db = reads[0][0]
    assert db[0][1] == (ipaddress.IPv4Interface, ipaddress.IPv4Interface("10.0.0.1/24"))
    assert db[1][2] == (ipaddress.IPv6Network, ipaddress.IPv6Network("2001:db8::/32"))
    assert db[0][6][0] is pg.Range and db[0][12][0] is pg.MultiRange
    assert cache.stats().get("unencodable", 0) == 0
    cache.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_asyncpg_rows_come_back_from_the_cache_exactly(
    pg_hosts, pg_async_url, backend, redis_url, key_prefix
):
    cache = Cache(backend="memory://" if backend == "memory" else redis_url, prefix=key_prefix)
    engine = create_async_engine(pg_async_url)
    seen = _counting(engine.sync_engine)
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache)
    stmt = select(Host).order_by(Host.id)
    columns = select(*Host.__table__.columns).order_by(Host.id)
    reads = []
    for _ in range(2):
        async with Session() as s:
            hosts = list((await s.scalars(stmt)).all())
            rows = (await s.execute(columns)).all()
            reads.append((fingerprint(hosts), [[exact(v) for v in r] for r in rows]))
    assert len(seen) == 2, "the second round must come from the cache"
    assert reads[0] == reads[1]
    # asyncpg's own zone for timestamptz bounds (psycopg gives a ZoneInfo): kept as it was
    assert reads[0][0][0][11][1][2] is timezone
    assert cache.stats().get("unencodable", 0) == 0
    await engine.dispose()
    await cache.aclose()


def test_the_codecs_round_trip_and_reject_bad_payloads():
    ip = codec_for(pg.INET())
    for v in (
        ipaddress.ip_address("::1"),
        ipaddress.ip_interface("10.1.2.3/8"),
        ipaddress.ip_network("::/0"),
    ):
        back = ip.decode(ip.encode(v))
        assert (type(back), back) == (type(v), v)
    r = codec_for(pg.TSTZRANGE())
    value = pg.Range(datetime(2020, 1, 1, tzinfo=timezone(timedelta(hours=2))), None, bounds="[]")
    assert exact(r.decode(r.encode(value))) == exact(value)
    for bad in ("x10.0.0.1", "a999.0.0.1", 7):
        with pytest.raises(CodecError):
            ip.decode(bad)
    for bad in ([1, 2, "[x", False], [1, 2], [1, 2, "[)", "no"]):
        with pytest.raises(CodecError):
            r.decode(bad)
    # a value of another type than the column's still round-trips (as elsewhere in the codec)
    assert r.decode(r.encode(date(2020, 1, 1))) == date(2020, 1, 1)
    # and one the codec cannot carry is refused at encode, naming its type
    with pytest.raises(CodecError, match="IPv4Address"):
        codec_for(pg.TSRANGE()).encode(ipaddress.ip_address("1.2.3.4"))


def test_reads_by_and_writes_of_these_types_stay_fresh(pg_hosts, redis_url, key_prefix):
    """Keys and invalidation handle the values too: a commit changing an address or a range evicts
    the reads that name it, and a read conditioned on one is cached (or not) but never stale."""
    cache = Cache(backend=redis_url, prefix=key_prefix)
    seen = _counting(pg_hosts)
    Session = sessionmaker(pg_hosts, class_=CachingSession, cache=cache)
    by_address = select(Host.id).where(Host.inet == ipaddress.ip_interface("10.0.0.1/24"))
    by_range = select(Host.id).where(Host.ints == pg.Range(1, 5))
    reads = [select(Host).where(Host.id == 1), by_address, by_range]

    def read_all() -> list[Any]:
        with Session() as s:
            return [
                fingerprint(list(s.scalars(reads[0]))),
                list(s.scalars(by_address)),
                list(s.scalars(by_range)),
            ]

    before = read_all()
    assert before[1:] == [[1], [1]]
    with Session() as s:
        assert cache.explain(by_address, s).cacheable and cache.explain(by_range, s).cacheable
    n = len(seen)
    assert read_all() == before
    assert len(seen) == n  # all three from the cache
    with Session() as s:
        host = s.get(Host, 1)
        host.inet = ipaddress.ip_interface("10.9.9.9/8")
        host.ints = pg.Range(2, 9)
        s.commit()
    after = read_all()
    assert after[1:] == [[], []]
    assert after[0][0][1] == (ipaddress.IPv4Interface, ipaddress.IPv4Interface("10.9.9.9/8"))
    assert after[0][0][6] == exact(pg.Range(2, 9))
    n = len(seen)
    assert read_all() == after
    assert len(seen) == n
    cache.invalidate_all()
    cache.close()
