"""A process serves what another process stored, for statement shapes it has never executed itself.

Process A (a spawned child) runs every read below: misses, stored in Redis. Then a fresh process B,
spawned after A's stores and so without any per-process memo, runs the same reads: each must be a
hit, with zero SQL statements, and give what A's database reads gave (values and their types, the
result's keys, ``scalars()``, rows, tuples, mappings, the relationships that were eager-loaded and
the attributes left unloaded, the same error where the ORM raises one). Sync (psycopg) and async
(asyncpg, Redis' asyncio client). The in-process tests do the same with a new Cache and the memos
of a fresh process (``_fresh_process_memos``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    LABEL_STYLE_NONE,
    create_engine,
    event,
    exc,
    exists,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Row, RowMapping
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import aliased, joinedload, load_only, selectinload, sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession
from sqlacache.read import plan
from tests.conftest import _pg_schema_url, _truncate_sync
from tests.helpers import aseed, seed
from tests.models import Base, Order, Tag, User, user_tags

# Result.tuples() (SQLAlchemy 2.1: deprecated, the result itself) is one of the reads.
pytestmark = pytest.mark.filterwarnings("ignore:The Result.tuples:DeprecationWarning")

# -- what a result looks like, as plain data that compares across processes ---------------------


def describe(value: Any, seen: set[Any] | None = None) -> Any:
    """A value of a result, as builtins: rows with their keys, objects with what is loaded on them
    (columns, relationships, and which attributes are left unloaded), values with their types.
    Never loads anything."""
    seen = set() if seen is None else seen
    if isinstance(value, Row):
        return ("Row", tuple(value._fields), [describe(v, seen) for v in value])
    if isinstance(value, RowMapping):
        return ("RowMapping", [(str(k), describe(v, seen)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return [describe(v, seen) for v in value]
    state = inspect(value, raiseerr=False)
    if state is not None and hasattr(state, "mapper") and hasattr(state, "dict"):
        ident = (type(value).__name__, state.identity)
        if ident in seen:
            return ("ref", *ident)
        seen.add(ident)
        mapper, loaded = state.mapper, state.dict
        columns = {p.key: describe(loaded[p.key], seen) for p in mapper.column_attrs if p.key in loaded}
        related = {
            p.key: describe(list(loaded[p.key]) if p.uselist else loaded[p.key], seen)
            for p in mapper.relationships
            if p.key in loaded
        }
        return (*ident, columns, related, sorted(state.unloaded), state.persistent)
    return (type(value).__name__, repr(value))


def table(result: Any) -> Any:
    return list(result.keys()), describe(result.all())


def by_entity(result: Any) -> Any:
    return [describe(row._mapping[User]) for row in result]


def by_column(result: Any) -> Any:
    return [(row._mapping[User.id], row._mapping[User.name], row._mapping["name"]) for row in result]


@dataclass(frozen=True)
class Read:
    """A read: a statement and how its result is consumed, or a function of the (sync) session."""

    name: str
    statement: Callable[[], Any] | None = None
    consume: Callable[[Any], Any] = table
    legacy: Callable[[Any], Any] | None = None  # Query (run_sync under asyncio)
    get: Any = None  # Session.get(User, get)


def _aliased_pairs() -> Any:
    nxt = aliased(User)
    return select(User, nxt).join(nxt, nxt.id == User.id + 1).order_by(User.id)


READS = [
    Read(
        "scalars of entities", lambda: select(User).order_by(User.id), lambda r: describe(r.scalars().all())
    ),
    Read("rows of an entity", lambda: select(User).order_by(User.id).where(User.id > 0)),
    Read("row._mapping[User]", lambda: select(User).order_by(User.id).where(User.id > 1), by_entity),
    Read(
        "typed columns",
        lambda: select(
            User.id, User.name, User.active, User.status, User.balance, User.joined, User.token
        ).order_by(User.id),
    ),
    Read(
        "mappings",
        lambda: select(User.id, User.name).order_by(User.id),
        lambda r: describe(r.mappings().all()),
    ),
    Read("row._mapping[column]", lambda: select(User.id, User.name).order_by(User.id.desc()), by_column),
    Read(
        "scalars of a column",
        lambda: select(User.name).order_by(User.id),
        lambda r: describe(r.scalars().all()),
    ),
    Read("two entities, joined", lambda: select(User, Order).join(User.orders).order_by(Order.id)),
    Read(
        "two entities, tuples()",
        lambda: select(User, Order).join(User.orders).order_by(Order.id.desc()),
        lambda r: describe(r.tuples().all()),
    ),
    Read("an entity and its alias", _aliased_pairs),
    Read(
        "selectinload",
        lambda: select(User).options(selectinload(User.orders), selectinload(User.tags)).order_by(User.id),
        lambda r: describe(r.scalars().all()),
    ),
    Read(
        "joinedload, unique()",
        lambda: select(User).options(joinedload(User.orders), joinedload(User.tags)).order_by(User.id),
        lambda r: describe(r.unique().scalars().all()),
    ),
    Read(
        "joinedload without unique(): the ORM's error",
        lambda: select(User).options(joinedload(User.orders)).order_by(User.id),
        lambda r: describe(r.scalars().all()),
    ),
    Read(
        "joinedload of a many-to-one",
        lambda: select(Order).options(joinedload(Order.user)).order_by(Order.id),
        lambda r: describe(r.scalars().all()),
    ),
    Read(
        "load_only",
        lambda: select(User).options(load_only(User.name)).order_by(User.id),
        lambda r: describe(r.scalars().all()),
    ),
    Read("with_only_columns", lambda: select(User).with_only_columns(User.name, User.id).order_by(User.id)),
    Read(
        "labels",
        lambda: select(User.name.label("who"), (User.id * 2).label("twice")).order_by(User.id),
        lambda r: describe(r.mappings().all()),
    ),
    Read("count", lambda: select(func.count()).select_from(User), lambda r: describe(r.scalar_one())),
    Read(
        "count per group",
        lambda: (
            select(User.id, func.count(Order.id).label("n"))
            .join(User.orders)
            .group_by(User.id)
            .order_by(User.id)
        ),
    ),
    # Core results (no ORM entity among the columns): the session returns the database's own.
    Read("exists", lambda: select(exists().where(User.name == "u2")), lambda r: describe(r.scalar())),
    Read(
        "count of a condition",
        lambda: select(func.count()).where(User.active),
        lambda r: describe(r.scalar()),
    ),
    Read(
        "a table's columns",
        lambda: (
            select(user_tags.c.user_id, user_tags.c.tag_id)
            .order_by(user_tags.c.user_id, user_tags.c.tag_id)
            .execution_options(cache=True)
        ),
    ),
    Read(
        "ambiguous names",
        lambda: (
            select(User.__table__.c.id, Tag.__table__.c.id)
            .join_from(User.__table__, user_tags)
            .join(Tag.__table__)
            .set_label_style(LABEL_STYLE_NONE)
            .order_by(User.__table__.c.id, Tag.__table__.c.id)
            .execution_options(cache=True)
        ),
        lambda r: (list(r.keys()), [row[0] for row in r], r.mappings().first()),
    ),
    Read(
        "ambiguous names, by name",
        lambda: (
            select(User.__table__.c.id, Tag.__table__.c.id)
            .join_from(User.__table__, user_tags)
            .join(Tag.__table__)
            .set_label_style(LABEL_STYLE_NONE)
            .order_by(Tag.__table__.c.id, User.__table__.c.id)
            .execution_options(cache=True)
        ),
        lambda r: [row._mapping["id"] for row in r],
    ),
    Read(
        "unique() of values",
        lambda: select(User.active).order_by(User.active),
        lambda r: describe(r.unique().scalars().all()),
    ),
    Read("scalar_one", lambda: select(User).where(User.id == 2), lambda r: describe(r.scalar_one())),
    Read("first of none", lambda: select(User).where(User.id == 99), lambda r: describe(r.first())),
    Read("Session.get", get=1),
    Read("Session.get of nothing", get=99),
    Read("Query", legacy=lambda s: describe(s.query(User).order_by(User.id).all())),
    Read("Query of columns", legacy=lambda s: describe(s.query(User.id, User.name).order_by(User.id).all())),
    Read(
        "Query, joinedload (legacy uniquing)",
        legacy=lambda s: describe(s.query(User).options(joinedload(User.orders)).order_by(User.id).all()),
    ),
    Read(
        "Query, two entities",
        legacy=lambda s: describe(s.query(User, Order).join(User.orders).order_by(Order.id).all()),
    ),
    Read(
        "Query.only_return_tuples",
        legacy=lambda s: describe(s.query(User).only_return_tuples(True).order_by(User.id).all()),
    ),
    Read("Query.count", legacy=lambda s: s.query(User).filter(User.id > 1).count()),
    Read("Query.first", legacy=lambda s: describe(s.query(User).filter(User.id == 3).first())),
]


# Reads of an entry an earlier read stored (a hit in process A too): the same statement read as
# tuples (another result mode, so another layout) as "Query".
ONE_ENTRY_TWO_READS = {"Query.only_return_tuples"}


def _error(e: Exception) -> Any:
    return ("error", type(e).__name__, str(e))


def run_read(session: Any, read: Read) -> Any:
    try:
        if read.get is not None:
            return describe(session.get(User, read.get))
        if read.legacy is not None:
            return read.legacy(session)
        assert read.statement is not None
        return read.consume(session.execute(read.statement()))
    except exc.InvalidRequestError as e:
        return _error(e)


async def arun_read(session: Any, read: Read) -> Any:
    try:
        if read.get is not None:
            return describe(await session.get(User, read.get))
        if read.legacy is not None:
            return await session.run_sync(read.legacy)
        assert read.statement is not None
        return read.consume(await session.execute(read.statement()))
    except exc.InvalidRequestError as e:
        return _error(e)


# -- the processes -------------------------------------------------------------------------------


def _reads_in_a_process(db_url: str, schema: str, redis_url: str, prefix: str, out: Any) -> None:
    """Run every read, each in a new session; report what each gave, the SQL sent and the stats."""
    url, args = _pg_schema_url(db_url, schema)
    engine = create_engine(url, connect_args=args)
    sql: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, statement, *a: sql.append(statement))
    cache = Cache(backend=redis_url, prefix=prefix)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    seen, queried = {}, {}
    try:
        for read in READS:
            before = len(sql)
            with Session() as s:
                seen[read.name] = run_read(s, read)
            queried[read.name] = sql[before:]
        cache.wait_for_stores()
        out.put({"pid": os.getpid(), "seen": seen, "sql": queried, "stats": cache.stats()})
    except BaseException as e:  # pragma: no cover - reported to the test
        out.put({"pid": os.getpid(), "failed": repr(e)})
    finally:
        cache.close()
        engine.dispose()


def _async_reads_in_a_process(db_url: str, schema: str, redis_url: str, prefix: str, out: Any) -> None:
    async def main() -> None:
        import redis.asyncio

        url, args = _pg_schema_url(db_url, schema)
        engine = create_async_engine(url, connect_args=args)
        sql: list[str] = []
        event.listen(
            engine.sync_engine, "before_cursor_execute", lambda c, cur, statement, *a: sql.append(statement)
        )
        cache = Cache(backend=redis.asyncio.Redis.from_url(redis_url), prefix=prefix)
        Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False)
        seen, queried = {}, {}
        try:
            for read in READS:
                before = len(sql)
                async with Session() as s:
                    seen[read.name] = await arun_read(s, read)
                queried[read.name] = sql[before:]
            await cache.await_for_stores()
            out.put({"pid": os.getpid(), "seen": seen, "sql": queried, "stats": cache.stats()})
        finally:
            await cache.aclose()
            await engine.dispose()

    try:
        asyncio.run(main())
    except BaseException as e:  # pragma: no cover - reported to the test
        out.put({"pid": os.getpid(), "failed": repr(e)})


def _in_a_fresh_process(target: Any, *args: Any) -> dict[str, Any]:
    """Run ``target(*args, out)`` in a newly spawned interpreter; what it put on ``out``."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, out))
    p.start()
    try:
        report: dict[str, Any] = out.get(timeout=120)
    finally:
        p.join(30)
        if p.is_alive():  # pragma: no cover
            p.kill()
    assert "failed" not in report, report
    return report


def _check(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["pid"] != b["pid"]
    hits_in_a = {r.name for r in READS if not a["sql"][r.name]}
    assert hits_in_a == ONE_ENTRY_TWO_READS, "process A read the database"
    assert a["stats"].get("unstorable", 0) == 0 and a["stats"].get("unencodable", 0) == 0, a["stats"]
    queried = {name: sql for name, sql in b["sql"].items() if sql}
    assert not queried, "process B should have sent no SQL"
    assert b["stats"].get("misses", 0) == 0, b["stats"]
    assert b["stats"]["hits"] == len(READS), b["stats"]
    assert b["stats"].get("errors", 0) == 0 and b["stats"].get("corrupt", 0) == 0, b["stats"]
    for read in READS:
        assert b["seen"][read.name] == a["seen"][read.name], read.name
    # The reads saw what they should: the error where the ORM raises one, the eager loads.
    assert a["seen"]["joinedload without unique(): the ORM's error"][0] == "error"
    users = a["seen"]["selectinload"]
    assert [sorted(u[3]) for u in users] == [["orders", "tags"]] * 3


@pytest.fixture
def stored_world(pg_sync_url: str, pg_schema: str, redis_url: str, key_prefix: str) -> Iterator[Cache]:
    url, args = _pg_schema_url(pg_sync_url, pg_schema)
    engine = create_engine(url, connect_args=args)
    _truncate_sync(engine)
    cache = Cache(backend=redis_url, prefix=key_prefix)

    class World:
        Session = sessionmaker(engine, class_=CachingSession, cache=cache)

    seed(World, 3)
    yield cache
    cache.invalidate_all()
    cache.close()
    engine.dispose()


def test_a_fresh_process_serves_what_another_stored_without_sql(
    stored_world: Cache, pg_sync_url: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    a = _in_a_fresh_process(_reads_in_a_process, pg_sync_url, pg_schema, redis_url, key_prefix)
    b = _in_a_fresh_process(_reads_in_a_process, pg_sync_url, pg_schema, redis_url, key_prefix)
    _check(a, b)


def test_a_fresh_asyncio_process_serves_what_another_stored_without_sql(
    stored_world: Cache, pg_sync_url: str, pg_async_url: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    a = _in_a_fresh_process(_async_reads_in_a_process, pg_async_url, pg_schema, redis_url, key_prefix)
    b = _in_a_fresh_process(_async_reads_in_a_process, pg_async_url, pg_schema, redis_url, key_prefix)
    _check(a, b)


def test_a_fresh_sync_process_serves_what_an_asyncio_process_stored(
    stored_world: Cache, pg_sync_url: str, pg_async_url: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    a = _in_a_fresh_process(_async_reads_in_a_process, pg_async_url, pg_schema, redis_url, key_prefix)
    b = _in_a_fresh_process(_reads_in_a_process, pg_sync_url, pg_schema, redis_url, key_prefix)
    _check(a, b)


# -- in one process: a new Cache and fresh memos -------------------------------------------------


@pytest.fixture
def _fresh_process_memos() -> Callable[[], None]:
    """Forget what this process learnt of statement shapes and keys, as a newly started one has."""

    def forget() -> None:
        plan._shapes.clear()
        plan.key_plans.clear()

    return forget


def test_a_new_cache_with_fresh_memos_serves_what_another_stored(
    world: Any, _fresh_process_memos: Any
) -> None:
    seed(world)
    stored = {}
    for read in READS:
        with world.Session() as s:
            stored[read.name] = run_read(s, read)
    world.cache.wait_for_stores()
    _fresh_process_memos()
    other = world.make_cache(prefix=world.cache.prefix)
    Session = sessionmaker(world.engine, class_=CachingSession, cache=other)
    before = world.statements()
    try:
        for read in READS:
            with Session() as s:
                assert run_read(s, read) == stored[read.name], read.name
        assert world.sql[before:] == []
        assert other.stats()["hits"] == len(READS)
    finally:
        other.close()


async def test_a_new_cache_with_fresh_memos_serves_asyncio_reads(
    aworld: Any, _fresh_process_memos: Any
) -> None:
    await aseed(aworld)
    stored = {}
    for read in READS:
        async with aworld.Session() as s:
            stored[read.name] = await arun_read(s, read)
    await aworld.cache.await_for_stores()
    _fresh_process_memos()
    other = aworld.make_cache(prefix=aworld.cache.prefix)
    Session = async_sessionmaker(
        aworld.engine, class_=CachingAsyncSession, cache=other, expire_on_commit=False
    )
    before = aworld.statements()
    try:
        for read in READS:
            async with Session() as s:
                assert await arun_read(s, read) == stored[read.name], read.name
        assert aworld.sql[before:] == []
        assert other.stats()["hits"] == len(READS)
    finally:
        await other.aclose()


def _first_reads_after_a_fresh_start(world: Any, forget: Any, read: Any) -> list[int]:
    """Store ``read``'s entry, forget the shapes as a new process would, and read it three times:
    how many statements each read sent."""
    with world.Session() as s:
        stored = read(s)
    world.cache.wait_for_stores()
    forget()
    sent = []
    for _ in range(3):
        before = world.statements()
        with world.Session() as s:
            assert read(s) == stored
        sent.append(world.statements() - before)
    return sent


def test_a_result_keyed_by_the_names_the_driver_sends_is_learnt_from_one_execution(
    world: Any, _fresh_process_memos: Any
) -> None:
    """The shapes left to the behaviour from before: a result whose keys are the names the database
    sends (``driver_column_names``, SQLAlchemy 2.1) can't be known before it runs, so a process runs
    its statement once before serving it."""
    seed(world)
    stmt = select(User.__table__.c.id, User.__table__.c.name).order_by(User.__table__.c.id)

    def read(s: Any) -> Any:
        return table(s.execute(stmt, execution_options={"cache": True, "driver_column_names": True}))

    assert _first_reads_after_a_fresh_start(world, _fresh_process_memos, read) == [1, 0, 0]


def test_a_shape_whose_layout_cannot_be_derived_is_learnt_from_one_execution(
    world: Any, _fresh_process_memos: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlacache.read import execute

    def fails(*args: Any) -> Any:
        raise RuntimeError("cannot")

    monkeypatch.setattr(execute, "derive_template", fails)
    seed(world)
    stmt = select(User).options(selectinload(User.orders)).order_by(User.id)

    def read(s: Any) -> Any:
        return describe(s.scalars(stmt).all())

    assert _first_reads_after_a_fresh_start(world, _fresh_process_memos, read) == [2, 0, 0]
    assert world.cache.stats()["errors"] == 0


def test_concurrent_first_hits_of_a_shape_derive_its_layout_once(
    world: Any, _fresh_process_memos: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from sqlacache.read import execute

    seed(world)
    stmt = select(User).options(selectinload(User.orders)).order_by(User.id)
    with world.Session() as s:
        stored = describe(s.scalars(stmt).all())
    world.cache.wait_for_stores()
    _fresh_process_memos()
    derived = []
    derive = execute.derive_template

    def counting(*args: Any) -> Any:
        derived.append(args)
        time.sleep(0.05)  # long enough for the other readers to arrive
        return derive(*args)

    monkeypatch.setattr(execute, "derive_template", counting)
    before = world.statements()
    results, barrier = [], threading.Barrier(8)

    def reader() -> None:
        with world.Session() as s:
            barrier.wait()
            results.append(describe(s.scalars(stmt).all()))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [stored] * 8
    assert world.sql[before:] == []
    assert len(derived) == 1


class _Owner:
    pass


class _Item:
    pass


def test_a_class_mapped_anew_rebuilds_entries_with_its_new_mapping(tmp_path: Any) -> None:
    """A class whose mapping was disposed of and made again in its registry (``clear_mappers()``, as
    tests do): a hit on an entry of it builds objects of the new mapping, whose lazy loads work."""
    from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table
    from sqlalchemy.orm import registry, relationship

    metadata = MetaData()
    owners = Table("owners", metadata, Column("id", Integer, primary_key=True), Column("name", String(20)))
    items = Table(
        "items",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("owner_id", ForeignKey("owners.id")),
    )
    reg = registry(metadata=metadata)

    def mapped() -> None:
        reg.map_imperatively(_Owner, owners)
        reg.map_imperatively(_Item, items, properties={"owner": relationship(_Owner)})
        reg.configure()

    engine = create_engine(f"sqlite:///{tmp_path / 'remap.db'}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(owners.insert(), [{"id": 1, "name": "o"}])
        conn.execute(items.insert(), [{"id": 1, "owner_id": 1}])
    cache = Cache(backend="memory://")
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    try:
        mapped()
        with Session() as s:
            assert [i.id for i in s.scalars(select(_Item))] == [1]
        reg.dispose()
        mapped()
        with Session() as s:
            (item,) = s.scalars(select(_Item)).all()
            assert cache.stats()["hits"] == 1
            assert inspect(item).mapper is inspect(_Item)
            assert item.owner.name == "o"  # type: ignore[attr-defined]
    finally:
        reg.dispose()
        cache.close()
        engine.dispose()


# -- attribute order: a hit sets columns in this process's load order, not the writer's ---------


def _store_users_in_a_process(db_file: str, redis_url: str, prefix: str, out: Any) -> None:
    try:
        engine = create_engine(f"sqlite:///{db_file}")
        cache = Cache(backend=redis_url, prefix=prefix)
        with CachingSession(engine, cache=cache) as s:
            s.scalars(select(User).order_by(User.id)).all()
        out.put({"pid": os.getpid(), "stats": cache.stats()})
        cache.close()
        engine.dispose()
    except Exception as e:  # pragma: no cover - reported to the parent
        out.put({"failed": repr(e)})


@pytest.mark.redis
def test_a_hit_on_another_processs_entry_has_this_processs_attribute_order(tmp_path, redis_url, key_prefix):
    """The ORM's loader sets an object's columns in an order fixed per process (the iteration order
    of a frozenset of properties); SQLModel's JSON and ``vars(obj)`` follow it. An entry written by
    another process, rebuilt here, must give the order a database load gives here."""
    db_file = tmp_path / "order.db"
    engine = create_engine(f"sqlite:///{db_file}")
    Base.metadata.create_all(engine)

    class Plain:
        Session = sessionmaker(engine)

    seed(Plain)
    writer = _in_a_fresh_process(_store_users_in_a_process, str(db_file), redis_url, key_prefix)
    assert writer["pid"] != os.getpid() and writer["stats"]["stores"] == 1, writer
    with Plain.Session() as s:
        loaded = [list(vars(u)) for u in s.scalars(select(User).order_by(User.id))]
    cache = Cache(backend=redis_url, prefix=key_prefix)
    try:
        with CachingSession(engine, cache=cache) as s:
            hit = [list(vars(u)) for u in s.scalars(select(User).order_by(User.id))]
        assert cache.stats()["hits"] == 1
        assert hit == loaded
    finally:
        cache.close()
        engine.dispose()
