"""SQLModel: ``sqlacache.sqlmodel``'s sessions keep ``session.exec(...)`` and cache it, sync and async,
on SQLite and on PostgreSQL + Redis; objects from a hit behave like SQLModel's own."""

# No "from __future__ import annotations": SQLModel resolves relationship annotations at class creation.
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession

sqlmodel = pytest.importorskip("sqlmodel")
from sqlmodel import Field, Relationship, SQLModel, func, select  # noqa: E402

from sqlacache.sqlmodel import CachingSQLModelAsyncSession, CachingSQLModelSession  # noqa: E402


class Crew(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str
    sailors: list["Sailor"] = Relationship(back_populates="crew")


class Sailor(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    age: int | None = None
    crew_id: int | None = Field(default=None, foreign_key="crew.id")
    crew: Crew | None = Relationship(back_populates="sailors")


TABLES = [Crew.__table__, Sailor.__table__]  # type: ignore[attr-defined]


def _seed() -> list[Any]:
    red, blue = Crew(id=1, name="red"), Crew(id=2, name="blue")
    return [
        red,
        blue,
        Sailor(id=1, name="ann", age=25, crew=red),
        Sailor(id=2, name="bob", age=41, crew=red),
        Sailor(id=3, name="cy", age=35, crew=blue),
    ]


def _record(sync_engine: Any) -> list[str]:
    sql: list[str] = []
    event.listen(sync_engine, "before_cursor_execute", lambda conn, cur, stmt, *a: sql.append(stmt))
    return sql


@pytest.fixture
def pg_schema_name(pg_sync_url: str) -> Iterator[str]:
    schema = f"sqlacache_sm_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield schema
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(params=["sqlite+memory", "postgres+redis"])
def sync_setup(request: Any, tmp_path: Any, key_prefix: str) -> Iterator[tuple[Any, Cache]]:
    if request.param == "sqlite+memory":
        engine = create_engine(f"sqlite:///{tmp_path / 'sm.db'}")
        cache = Cache()
    else:
        schema = request.getfixturevalue("pg_schema_name")
        url = request.getfixturevalue("pg_sync_url")
        engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
        cache = Cache(backend=request.getfixturevalue("redis_url"), prefix=key_prefix)
    SQLModel.metadata.create_all(engine, tables=TABLES)
    yield engine, cache
    cache.invalidate_all()
    cache.close()
    engine.dispose()


@pytest.fixture(params=["aiosqlite+memory", "asyncpg+redis"])
async def async_setup(request: Any, tmp_path: Any, key_prefix: str) -> AsyncIterator[tuple[Any, Cache]]:
    if request.param == "aiosqlite+memory":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'sm.db'}")
        cache = Cache()
    else:
        schema = request.getfixturevalue("pg_schema_name")
        url = request.getfixturevalue("pg_async_url")
        engine = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
        cache = Cache(backend=request.getfixturevalue("redis_url"), prefix=key_prefix)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: SQLModel.metadata.create_all(c, tables=TABLES))
    yield engine, cache
    await cache.ainvalidate_all()
    await cache.aclose()
    await engine.dispose()


def _reads(session: Any) -> Any:
    """What a SQLModel app reads: exec() with all/first/one, get, relationships both ways."""
    older = session.exec(select(Sailor).where(Sailor.age > 30).order_by(Sailor.id)).all()
    first = session.exec(select(Sailor).where(Sailor.name == "ann")).first()
    one = session.exec(select(Crew).where(Crew.name == "red")).one()
    count = session.exec(select(func.count()).select_from(Sailor)).one()
    pairs = session.exec(select(Sailor.name, Crew.name).join(Crew).order_by(Sailor.id)).all()
    got = session.get(Sailor, 2)
    return (
        [(s.id, s.name, s.age) for s in older],
        (first.id, first.crew.name) if first is not None else None,
        (one.id, [s.name for s in one.sailors]),
        count,
        [tuple(p) for p in pairs],
        (got.name, got.crew.name) if got is not None else None,
    )


def test_sync_session_keeps_exec_and_caches_it(sync_setup):
    engine, cache = sync_setup
    Session = sessionmaker(engine, class_=CachingSQLModelSession, cache=cache)
    with Session() as session:
        assert isinstance(session, sqlmodel.Session) and isinstance(session, CachingSession)
        session.add_all(_seed())
        session.commit()
    sql = _record(engine)
    for _ in range(2):  # a cold cache may refuse its very first stores
        with Session() as session:
            expected = _reads(session)
    cache.wait_for_stores()
    before = len(sql)
    with Session() as session:
        assert _reads(session) == expected
        assert len(sql) == before, sql[before:]  # every read, relationships included, was a hit
        hit = session.exec(select(Sailor).where(Sailor.name == "bob")).one()
        assert isinstance(hit, Sailor) and hit.model_dump() == {
            "id": 2,
            "name": "bob",
            "age": 41,
            "crew_id": 1,
        }
    assert expected[0] == [(2, "bob", 41), (3, "cy", 35)]
    assert expected[1:4] == ((1, "red"), (1, ["ann", "bob"]), 3)

    with Session() as session:  # writes through SQLModel objects from a hit: evicted at commit
        bob = session.exec(select(Sailor).where(Sailor.name == "bob")).one()
        bob.age, bob.crew_id = 29, 2
        session.add(Sailor(id=4, name="dee", age=50, crew_id=1))
        session.commit()
    with Session() as session:
        after = _reads(session)
    assert after[0] == [(3, "cy", 35), (4, "dee", 50)]
    assert after[2] == (1, ["ann", "dee"]) and after[3] == 4
    assert after[5] == ("bob", "blue")


def test_sync_session_runs_deferred_reads_before_exec(tmp_path):
    """A read the configuration doesn't cache is deferred by execute(); exec() must run it first."""
    engine = create_engine(f"sqlite:///{tmp_path / 'd.db'}")
    SQLModel.metadata.create_all(engine, tables=TABLES)
    cache = Cache(models={Crew: {"ops": "all"}})  # Sailor reads are not cached
    with CachingSQLModelSession(engine, cache=cache) as session:
        session.add_all(_seed())
        session.commit()
        sql = _record(engine)
        names = session.execute(select(Sailor.name).order_by(Sailor.id))  # deferred: no SQL yet
        assert sql == []
        session.exec(select(Crew).where(Crew.id == 1)).one()
        assert ["sailor" in q.split("FROM")[1] for q in sql] == [True, False]  # the deferred read first
        session.exec(sqlmodel.delete(Sailor))
        assert session.exec(select(Sailor)).all() == []
        del names
    cache.close()


async def _areads(session: Any) -> Any:
    older = (await session.exec(select(Sailor).where(Sailor.age > 30).order_by(Sailor.id))).all()
    first = (await session.exec(select(Sailor).where(Sailor.name == "ann"))).first()
    one = (await session.exec(select(Crew).where(Crew.name == "red"))).one()
    crew_of_first = await session.get(Crew, first.crew_id)
    got = await session.get(Sailor, 2)
    count = (await session.exec(select(func.count()).select_from(Sailor))).one()
    return (
        [(s.id, s.name, s.age) for s in older],
        (first.id, crew_of_first.name),
        one.id,
        (got.name, got.age) if got is not None else None,
        count,
    )


async def test_async_session_keeps_exec_and_caches_it(async_setup):
    engine, cache = async_setup
    Session = async_sessionmaker(
        engine, class_=CachingSQLModelAsyncSession, cache=cache, expire_on_commit=False
    )
    async with Session() as session:
        assert isinstance(session, sqlmodel.ext.asyncio.session.AsyncSession)
        assert isinstance(session, CachingAsyncSession)
        assert isinstance(session.sync_session, CachingSQLModelSession)
        session.add_all(_seed())
        await session.commit()
    sql = _record(engine.sync_engine)
    for _ in range(2):
        async with Session() as session:
            expected = await _areads(session)
    await cache.await_for_stores()
    before = len(sql)
    async with Session() as session:
        assert await _areads(session) == expected
        assert len(sql) == before, sql[before:]
    assert expected == ([(2, "bob", 41), (3, "cy", 35)], (1, "red"), 1, ("bob", 41), 3)

    async with Session() as session:
        bob = await session.get(Sailor, 2)
        bob.age = 29
        session.add(Sailor(id=4, name="dee", age=50, crew_id=1))
        await session.commit()
    async with Session() as session:
        after = await _areads(session)
    assert after[0] == [(3, "cy", 35), (4, "dee", 50)] and after[3] == ("bob", 29) and after[4] == 4


def test_a_hit_serializes_like_a_database_load(sync_setup: tuple[Any, Cache]) -> None:
    """SQLModel's JSON (a FastAPI response) lists an object's fields in its ``__dict__`` order, which
    a database load sets in an order of its own: a hit rebuilt the columns in declaration order, so
    the same row answered ``{"name":…,"id":…}`` on a miss and ``{"id":…,"name":…}`` on a hit."""
    from sqlmodel import Session as PlainSession

    engine, cache = sync_setup
    with PlainSession(engine) as s:
        s.add_all(_seed())
        s.commit()
    with PlainSession(engine) as s:
        loaded = [s.get(Sailor, 1).model_dump_json(), *(x.model_dump_json() for x in s.exec(select(Sailor)))]
    assert '"id"' in loaded[0]
    Session = sessionmaker(engine, class_=CachingSQLModelSession, cache=cache)
    for _ in range(2):  # a miss, then a hit
        with Session() as s:
            got = [s.get(Sailor, 1).model_dump_json(), *(x.model_dump_json() for x in s.exec(select(Sailor)))]
        assert got == loaded
    assert cache.stats()["hits"] == 2
