"""A stateful oracle: random operations through caching sessions, every cached read checked against the DB.

A hypothesis ``RuleBasedStateMachine`` drives

* one *writer* session: ORM inserts, updates (also ones that move rows into and out of filters, and
  moving an order to another user), deletes with ORM and database cascades, many-to-many changes, ORM
  bulk UPDATE/DELETE with every ``synchronize_session``, Core inserts, raw SQL, commits, rollbacks and
  savepoints. It holds on to what it loaded, as an application does; with ``expire_on_commit=False``
  (drawn per example) those objects outlive commits and can be older than the database when updated;
* *other sessions* that change a row and commit, often one the writer holds (a race), sometimes
  through a second ``Cache`` on the same backend (another process);
* short-lived *reader* sessions ("requests").

Reads of many shapes (``get``, filtered lists, ranges, ``IN``, ``OR``, ``LIKE``, counts, ``exists``,
joins, eager and lazy loads, column and aggregate selects) are drawn from small value domains, so the
same statements repeat and the cache serves hits. Every cached read is compared:

* in a reader, with the same read through a plain ``Session`` on a separate, non-caching engine (the
  committed truth), and with the same read uncached (``execution_options={"cache": False}``);
* in the writer, with the same read uncached in the same session and transaction (so it sees the
  transaction's own writes): after ``expire_all()``, values and rows; without it (the session keeping
  its own, possibly older, copies: normal ORM behaviour), which rows come back;
* after every commit, every statement read so far in the example (and a few families of reads) again,
  in a fresh session, against the truth: whatever that commit should have evicted is looked at.

A cache that serves anything older than a finished commit, leaks uncommitted or rolled-back data, or
mishandles savepoints makes a read differ; the failure names the statement and shows the cached and the
true results, and hypothesis shrinks the run to a minimal program.

Worlds: sync SQLite + memory, sync SQLite + Redis, sync PostgreSQL + Redis, async aiosqlite + memory,
async asyncpg + Redis (the async ones drive ``CachingAsyncSession`` through one event loop per test), and
the near worlds: SQLite, PostgreSQL and asyncpg + Redis with ``near_cache=True`` (strict) in both caches,
and PostgreSQL on the Redis Cluster backend (a throwaway 3-master cluster).
Both caches of a world watch the same database, so a commit through one evicts the other's near-cache
directly, not through the fan-out (tests/test_near_fanout.py has real processes for that).
``SQLACACHE_ORACLE_EXAMPLES=<n>`` runs ``n`` examples in every world instead of the default budget (about
40 s for the module on a 2-core machine) for long soak runs, e.g. ``SQLACACHE_ORACLE_EXAMPLES=1000``.

SQLite engines use SQLAlchemy's documented pysqlite/aiosqlite recipe for working SAVEPOINTs (by default
the driver lets ``RELEASE SAVEPOINT`` commit the whole transaction, behind the session's back) and
enforce foreign keys, so ``ON DELETE CASCADE`` happens in every world.
"""

from __future__ import annotations

import asyncio
import decimal
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pprint import pformat
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import create_engine, delete, event, exists, func, insert, inspect, or_, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession
from tests.conftest import _pg_schema_url
from tests.models import Base, Order, Status, Tag, User, user_tags

# ---------------------------------------------------------------------------------------------
# Budget

_EXAMPLES = {
    "sqlite+memory": 60,
    "sqlite+redis": 50,
    "postgres+redis": 40,
    "aiosqlite+memory": 40,
    "asyncpg+redis": 30,
    # Near worlds: the Redis worlds with near_cache=True (strict) in both caches (conftest.py).
    "sqlite+redis+near": 30,
    "postgres+redis+near": 25,
    "asyncpg+redis+near": 20,
    # The Redis Cluster backend on the session's throwaway 3-master cluster (conftest.py); like the
    # near worlds, these run in the extended step (pytest --worlds=extended).
    "postgres+cluster": 20,
    "asyncpg+cluster": 15,
}
_STEPS = {
    "sqlite+memory": 50,
    "sqlite+redis": 50,
    "postgres+redis": 40,
    "aiosqlite+memory": 45,
    "asyncpg+redis": 40,
    "sqlite+redis+near": 50,
    "postgres+redis+near": 40,
    "asyncpg+redis+near": 40,
    "postgres+cluster": 40,
    "asyncpg+cluster": 40,
}


def _examples(world: str) -> int:
    override = os.environ.get("SQLACACHE_ORACLE_EXAMPLES")
    return int(override) if override else _EXAMPLES[world]


# ---------------------------------------------------------------------------------------------
# Value domains: small, so statements repeat and the cache gets hits.

UIDS = st.integers(1, 6)
OIDS = st.integers(1, 8)
TIDS = st.integers(1, 3)
NAME_VALUES = ["ann", "amy", "bob", "cy"]
NAMES = st.sampled_from(NAME_VALUES)
TOTALS = st.integers(0, 3)
BALANCES = st.sampled_from([decimal.Decimal("0.00"), decimal.Decimal("1.50"), decimal.Decimal("7.25")])
STATUSES = st.sampled_from(list(Status))
NOCACHE = {"cache": False}


# ---------------------------------------------------------------------------------------------
# Reads: what to run, and how to turn its result into plain data.


@dataclass(frozen=True, eq=False)
class Read:
    label: str
    kind: str  # "get" | "rows" | "lazy"
    stmt: Any = None
    model: Any = None
    ident: Any = None
    rel: str = ""
    rels: dict[Any, tuple[str, ...]] = field(default_factory=dict)
    unique: bool = False

    def __repr__(self) -> str:
        return f"Read({self.label!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # how hypothesis prints a failing program
        p.text(repr(self))

    def sql(self) -> str:
        if self.stmt is None:
            return self.label
        try:
            return str(self.stmt.compile(compile_kwargs={"literal_binds": True}))
        except Exception:
            return str(self.stmt)

    def lazy_stmt(self) -> Any:
        if self.rel == "orders":
            return select(Order).where(Order.user_id == self.ident).order_by(Order.id)
        return (
            select(Tag)
            .join(user_tags, user_tags.c.tag_id == Tag.id)
            .where(user_tags.c.user_id == self.ident)
            .order_by(Tag.id)
        )


def _rows(
    label: str, stmt: Any, rels: dict[Any, tuple[str, ...]] | None = None, unique: bool = False
) -> Read:
    return Read(label, "rows", stmt=stmt, rels=rels or {}, unique=unique)


GETS = st.one_of(
    st.builds(lambda i: Read(f"get(User, {i})", "get", model=User, ident=i), UIDS),
    st.builds(lambda i: Read(f"get(Order, {i})", "get", model=Order, ident=i), OIDS),
)

LISTS = st.one_of(
    st.builds(
        lambda n: _rows(f"users name == {n!r}", select(User).where(User.name == n).order_by(User.id)), NAMES
    ),
    st.just(_rows("active users", select(User).where(User.active.is_(True)).order_by(User.id))),
    st.just(_rows("banned users", select(User).where(User.status == Status.banned).order_by(User.id))),
    st.builds(
        lambda ids: _rows(f"users id in {ids}", select(User).where(User.id.in_(ids)).order_by(User.id)),
        st.sampled_from([(1, 2), (2, 3, 5), (4, 6)]),
    ),
    st.builds(
        lambda n: _rows(
            f"users name == {n!r} or inactive",
            select(User).where(or_(User.name == n, User.active.is_(False))).order_by(User.id),
        ),
        NAMES,
    ),
    st.builds(
        lambda p: _rows(f"users name like {p!r}", select(User).where(User.name.like(p)).order_by(User.id)),
        st.sampled_from(["a%", "%y", "b%"]),
    ),
    st.builds(
        lambda t: _rows(f"orders total > {t}", select(Order).where(Order.total > t).order_by(Order.id)),
        TOTALS,
    ),
    st.builds(
        lambda u: _rows(f"orders of user {u}", select(Order).where(Order.user_id == u).order_by(Order.id)),
        UIDS,
    ),
    st.just(_rows("all orders", select(Order).order_by(Order.id))),
)

COLUMNS = st.one_of(
    st.just(_rows("names of active users", select(User.name).where(User.active.is_(True)).order_by(User.id))),
    st.just(_rows("user columns", select(User.id, User.balance, User.status, User.active).order_by(User.id))),
    st.builds(
        lambda u: _rows(
            f"order columns of user {u}",
            select(Order.id, Order.total).where(Order.user_id == u).order_by(Order.id),
        ),
        UIDS,
    ),
    st.builds(
        lambda b: _rows(
            f"count users active is {b}", select(func.count()).select_from(User).where(User.active.is_(b))
        ),
        st.booleans(),
    ),
    st.builds(
        lambda t: _rows(
            f"count orders total >= {t}", select(func.count()).select_from(Order).where(Order.total >= t)
        ),
        TOTALS,
    ),
    st.builds(
        lambda u, t: _rows(
            f"exists order of user {u} with total {t}",
            select(exists().where(Order.user_id == u, Order.total == t)),
        ),
        UIDS,
        TOTALS,
    ),
    st.builds(
        lambda n: _rows(
            f"exists user named {n!r}", select(exists().where(User.name == n, User.active.is_(True)))
        ),
        NAMES,
    ),
    st.just(
        _rows(
            "sum of totals per user",
            select(Order.user_id, func.sum(Order.total), func.count())
            .group_by(Order.user_id)
            .order_by(Order.user_id),
        )
    ),
)

JOINS = st.one_of(
    st.builds(
        lambda t: _rows(
            f"users join orders where total == {t}",
            select(User).join(User.orders).where(Order.total == t).order_by(User.id, Order.id),
        ),
        TOTALS,
    ),
    st.builds(
        lambda n: _rows(
            f"orders join user where name == {n!r}",
            select(Order).join(Order.user).where(User.name == n).order_by(Order.id),
        ),
        NAMES,
    ),
    st.just(
        _rows(
            "name, total of active users' orders",
            select(User.name, Order.total)
            .join(Order, Order.user_id == User.id)
            .where(User.active.is_(True))
            .order_by(Order.id),
        )
    ),
    st.builds(
        lambda t: _rows(
            f"users join tags where tag == {t}",
            select(User).join(User.tags).where(Tag.id == t).order_by(User.id),
        ),
        TIDS,
    ),
)

EAGER = st.one_of(
    st.builds(
        lambda k: _rows(
            f"users id <= {k} selectinload orders",
            select(User).options(selectinload(User.orders)).where(User.id <= k).order_by(User.id),
            {User: ("orders",)},
        ),
        st.sampled_from([3, 6]),
    ),
    st.builds(
        lambda t: _rows(
            f"orders total == {t} joinedload user",
            select(Order).options(joinedload(Order.user)).where(Order.total == t).order_by(Order.id),
            {Order: ("user",)},
        ),
        TOTALS,
    ),
    st.just(
        _rows(
            "users selectinload tags",
            select(User).options(selectinload(User.tags)).order_by(User.id),
            {User: ("tags",)},
        )
    ),
    st.builds(
        lambda n: _rows(
            f"users name == {n!r} selectinload orders, tags",
            select(User)
            .options(selectinload(User.orders), selectinload(User.tags))
            .where(User.name == n)
            .order_by(User.id),
            {User: ("orders", "tags")},
        ),
        NAMES,
    ),
    st.just(
        _rows(
            "active users joinedload orders",
            select(User).options(joinedload(User.orders)).where(User.active.is_(True)).order_by(User.id),
            {User: ("orders",)},
            unique=True,
        )
    ),
)

LAZY = st.builds(
    lambda u, rel: Read(f"get(User, {u}).{rel} (lazy load)", "lazy", ident=u, rel=rel),
    UIDS,
    st.sampled_from(["orders", "tags"]),
)

ANY_READ = st.one_of(GETS, LISTS, COLUMNS, JOINS, EAGER, LAZY)

# Sweeps: whole families of reads at once, so that whatever a commit should have evicted is likely
# to be cached when it happens, and looked at again afterwards.
SWEEPS = {
    "users by name": [
        _rows(f"users name == {n!r}", select(User).where(User.name == n).order_by(User.id))
        for n in NAME_VALUES
    ],
    "orders by user": [
        _rows(f"orders of user {u}", select(Order).where(Order.user_id == u).order_by(Order.id))
        for u in range(1, 7)
    ],
    "users by get": [Read(f"get(User, {i})", "get", model=User, ident=i) for i in range(1, 7)],
    "orders by get": [Read(f"get(Order, {i})", "get", model=Order, ident=i) for i in range(1, 9)],
    "users by flag": [
        _rows("active users", select(User).where(User.active.is_(True)).order_by(User.id)),
        _rows("inactive users", select(User).where(User.active.is_(False)).order_by(User.id)),
        _rows("banned users", select(User).where(User.status == Status.banned).order_by(User.id)),
        _rows(
            "active, not banned",
            select(User).where(User.active, User.status == Status.active).order_by(User.id),
        ),
    ],
}

# What another session changes: (model, id, column, value).
OTHER_CHANGES = st.one_of(
    st.tuples(st.just("User"), UIDS, st.just("name"), NAMES),
    st.tuples(st.just("User"), UIDS, st.just("active"), st.booleans()),
    st.tuples(st.just("Order"), OIDS, st.just("total"), TOTALS),
    st.tuples(st.just("Order"), OIDS, st.just("user_id"), UIDS),
)


def _persistent(obj: Any) -> bool:
    state = inspect(obj)
    return state.persistent and state.identity is not None


UNLOADED = "<unloaded>"
_COLUMNS = {
    User: ("id", "name", "active", "status", "balance", "joined", "token"),
    Order: ("id", "user_id", "total"),
    Tag: ("id", "label"),
}


def _value(v: Any) -> Any:
    # bool and Decimal by repr: True == 1 and Decimal("1.50") == Decimal("1.5") would hide codec slips.
    return repr(v) if isinstance(v, (bool, decimal.Decimal)) else v


def _entity(obj: Any, rels: dict[Any, tuple[str, ...]]) -> Any:
    """Column values (from the instance dict: nothing loads here) plus eager-loaded relationships."""
    if obj is None:
        return None
    d = inspect(obj).dict
    cls = type(obj)
    out: list[Any] = [cls.__name__, *(_value(d[c]) if c in d else UNLOADED for c in _COLUMNS[cls])]
    for rel in rels.get(cls, ()):
        if rel not in d:
            out.append((rel, UNLOADED))
        elif isinstance(d[rel], list):
            out.append((rel, tuple(_entity(x, {}) for x in d[rel])))
        else:
            out.append((rel, _entity(d[rel], {})))
    return tuple(out)


def _norm(value: Any, rels: dict[Any, tuple[str, ...]]) -> Any:
    if hasattr(value, "_sa_instance_state"):
        return _entity(value, rels)
    if isinstance(value, Row):
        return tuple(_norm(v, rels) for v in value)
    return _value(value)


def _ident(value: Any) -> Any:
    if hasattr(value, "_sa_instance_state"):
        return (type(value).__name__, inspect(value).identity)
    if isinstance(value, Row):
        return tuple(_ident(v) for v in value)
    return _value(value)


# ---------------------------------------------------------------------------------------------
# Drivers: the same operations on a sync Session or, through a persistent event loop, an AsyncSession.


class SyncDriver:
    is_async = False

    def open(self, factory: Any) -> Any:
        return factory()

    def get(self, s: Any, model: Any, ident: Any, opts: dict[str, Any]) -> Any:
        return s.get(model, ident, execution_options=opts)

    def rows(self, s: Any, stmt: Any, opts: dict[str, Any], unique: bool = False) -> list[Any]:
        result = s.execute(stmt, execution_options=opts)
        return list((result.unique() if unique else result).all())

    def execute(self, s: Any, stmt: Any, params: Any = None, opts: dict[str, Any] | None = None) -> None:
        s.execute(stmt, params, execution_options=opts or {})

    def run_sync(self, s: Any, fn: Callable[[Any], Any]) -> Any:
        return fn(s)

    def delete(self, s: Any, obj: Any) -> None:
        s.delete(obj)

    def flush(self, s: Any) -> None:
        s.flush()

    def commit(self, s: Any) -> None:
        s.commit()

    def rollback(self, s: Any) -> None:
        s.rollback()

    def close(self, s: Any) -> None:
        s.close()

    def begin_nested(self, s: Any) -> Any:
        return s.begin_nested()

    def end_nested(self, sp: Any, release: bool) -> None:
        if release:
            sp.commit()
        else:
            sp.rollback()

    def invalidate_all(self, cache: Cache) -> None:
        cache.invalidate_all()

    def invalidate(self, cache: Cache, model: Any = None, pks: Any = None, tables: Any = ()) -> None:
        cache.invalidate(model, pks, tables=tables)


class AsyncDriver:
    is_async = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, awaitable: Any) -> Any:
        async def go() -> Any:
            return await awaitable

        return self.loop.run_until_complete(go())

    def open(self, factory: Any) -> Any:
        return factory()

    def get(self, s: Any, model: Any, ident: Any, opts: dict[str, Any]) -> Any:
        return self.run(s.get(model, ident, execution_options=opts))

    def rows(self, s: Any, stmt: Any, opts: dict[str, Any], unique: bool = False) -> list[Any]:
        result = self.run(s.execute(stmt, execution_options=opts))
        return list((result.unique() if unique else result).all())

    def execute(self, s: Any, stmt: Any, params: Any = None, opts: dict[str, Any] | None = None) -> None:
        self.run(s.execute(stmt, params, execution_options=opts or {}))

    def run_sync(self, s: Any, fn: Callable[[Any], Any]) -> Any:
        return self.run(s.run_sync(fn))

    def delete(self, s: Any, obj: Any) -> None:
        self.run(s.delete(obj))

    def flush(self, s: Any) -> None:
        self.run(s.flush())

    def commit(self, s: Any) -> None:
        self.run(s.commit())

    def rollback(self, s: Any) -> None:
        self.run(s.rollback())

    def close(self, s: Any) -> None:
        self.run(s.close())

    def begin_nested(self, s: Any) -> Any:
        return self.run(s.begin_nested())

    def end_nested(self, sp: Any, release: bool) -> None:
        self.run(sp.commit() if release else sp.rollback())

    def invalidate_all(self, cache: Cache) -> None:
        self.run(cache.ainvalidate_all())

    def invalidate(self, cache: Cache, model: Any = None, pks: Any = None, tables: Any = ()) -> None:
        self.run(cache.ainvalidate(model, pks, tables=tables))


# ---------------------------------------------------------------------------------------------
# The world a machine runs in.


@dataclass
class Env:
    name: str
    driver: Any
    Session: Any  # caching sessions on `cache` (the writer and most readers)
    OtherSession: Any  # caching sessions on `other_cache`: another Cache on the same backend
    cache: Cache
    other_cache: Cache
    plain_engine: Any  # a separate, non-caching sync engine on the same database: the truth
    engine: Any  # the caching sessions' engine (used, with plain sessions, to reseed)
    server_db: bool = False  # PostgreSQL: a reader's snapshot doesn't stop another session's commit
    examples: int = 0
    steps: int = 0
    compared: int = 0

    def hits(self) -> int:
        return int(self.cache.stats()["hits"]) + int(self.other_cache.stats()["hits"])

    def reset(self) -> None:
        """Fresh rows and an empty cache: every example starts from the same state."""
        if self.driver.is_async:
            # Through the async engine: a commit there also evicts from every cache watching the
            # database, and an asyncio-only Redis client can only be used from SQLAlchemy's greenlet.
            async def reseed() -> None:
                async with AsyncSession(self.engine) as s:
                    await s.run_sync(_reseed)

            self.driver.run(reseed())
        else:
            with Session(self.engine) as s:
                _reseed(s)
        self.driver.invalidate_all(self.cache)


def _reseed(s: Session) -> None:
    for table in reversed(Base.metadata.sorted_tables):
        s.execute(table.delete())
    tags = [Tag(id=1, label="red"), Tag(id=2, label="blue"), Tag(id=3, label="green")]
    seed = [
        (1, "ann", True, Status.active, "1.50", [(1, 0), (2, 2)], [0, 1]),
        (2, "bob", True, Status.active, "0.00", [(3, 1)], [1]),
        (3, "amy", False, Status.banned, "7.25", [(4, 3)], []),
        (4, "cy", True, Status.banned, "0.00", [(5, 2)], [2]),
    ]
    s.add_all(tags)
    s.add_all(
        User(
            id=uid,
            name=name,
            active=active,
            status=status,
            balance=decimal.Decimal(balance),
            token=uuid.UUID(int=uid),
            orders=[Order(id=oid, total=total) for oid, total in orders],
            tags=[tags[i] for i in tag_indexes],
        )
        for uid, name, active, status, balance, orders, tag_indexes in seed
    )
    s.commit()


def _sqlite_engine_setup(sync_engine: Any, savepoints: bool) -> None:
    @event.listens_for(sync_engine, "connect")
    def _(dbapi_connection: Any, record: Any) -> None:
        if savepoints:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    if savepoints:

        @event.listens_for(sync_engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")


WORLDS = list(_EXAMPLES)


@pytest.fixture(params=WORLDS)
def oracle_env(request: pytest.FixtureRequest, tmp_path: Any, key_prefix: str) -> Iterator[Env]:
    db, backend_kind = request.param.split("+")[:2]
    near: dict[str, Any] = {"near_cache": True} if request.param.endswith("+near") else {}
    is_async = db in ("aiosqlite", "asyncpg")
    loop = asyncio.new_event_loop() if is_async else None
    driver: Any = AsyncDriver(loop) if loop is not None else SyncDriver()

    if db in ("sqlite", "aiosqlite"):
        path = tmp_path / "oracle.db"
        plain_engine = create_engine(f"sqlite:///{path}")
        _sqlite_engine_setup(plain_engine, savepoints=False)
        Base.metadata.create_all(plain_engine)
        if is_async:
            engine: Any = create_async_engine(f"sqlite+aiosqlite:///{path}")
            _sqlite_engine_setup(engine.sync_engine, savepoints=True)
        else:
            engine = create_engine(f"sqlite:///{path}")
            _sqlite_engine_setup(engine, savepoints=True)
    else:
        schema = request.getfixturevalue("pg_schema")
        url, args = _pg_schema_url(request.getfixturevalue("pg_sync_url"), schema)
        plain_engine = create_engine(url, connect_args=args)
        if is_async:
            aurl, aargs = _pg_schema_url(request.getfixturevalue("pg_async_url"), schema)
            engine = create_async_engine(aurl, connect_args=aargs)
        else:
            engine = create_engine(url, connect_args=args)

    if backend_kind == "memory":
        backend: Any = "memory://"
    elif backend_kind == "cluster":
        backend = request.getfixturevalue("redis_cluster").url
    elif near:  # the near-cache's subscriber thread needs the sync client a URL makes too
        backend = request.getfixturevalue("redis_url")
    elif is_async:
        import redis.asyncio

        backend = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        import redis

        backend = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    cache = Cache(backend=backend, prefix=key_prefix, **near)
    other_cache = Cache(backend=cache.backend, prefix=key_prefix, **near)
    if is_async:
        factory: Any = async_sessionmaker(
            engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False
        )
        other: Any = async_sessionmaker(
            engine, class_=CachingAsyncSession, cache=other_cache, expire_on_commit=False
        )
    else:
        factory = sessionmaker(engine, class_=CachingSession, cache=cache)
        other = sessionmaker(engine, class_=CachingSession, cache=other_cache)
    env = Env(
        request.param,
        driver,
        factory,
        other,
        cache,
        other_cache,
        plain_engine,
        engine,
        db == "postgres" or db == "asyncpg",
    )
    yield env
    if loop is not None:
        driver.invalidate_all(cache)
        driver.run(other_cache.aclose())
        driver.run(cache.aclose())
        driver.run(engine.dispose())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    else:
        cache.invalidate_all()
        other_cache.close()
        cache.close()
        engine.dispose()
    plain_engine.dispose()


# ---------------------------------------------------------------------------------------------
# The machine.


class CacheOracle(RuleBasedStateMachine):
    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        self.d = env.driver
        env.reset()
        env.examples += 1
        self._writer: Any = None
        # Objects the writer loaded, held like an application holds them (the identity map alone
        # is weak): with expire_on_commit=False they outlive commits, and may go out of date.
        self.held: list[Any] = []
        # Rows another session changed while the writer held them.
        self.contended: set[tuple[Any, int]] = set()
        # Every read made so far (label -> Read): re-read after each commit.
        self.seen: dict[str, Read] = {}
        self.writer_options: dict[str, Any] = {}
        self.dirty = False
        self.savepoints: list[Any] = []

    # -- helpers --------------------------------------------------------------------------

    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self.d.open(lambda: self.env.Session(**self.writer_options))
        return self._writer

    def teardown(self) -> None:
        if self._writer is not None:
            self.d.close(self._writer)
            self._writer = None
        self.held.clear()
        self.dirty = False

    def _may_write_elsewhere(self) -> bool:
        """Another session may commit now without waiting for the writer's locks; on SQLite the
        writer must not even hold a read snapshot (its next write would fail with SQLITE_BUSY)."""
        if self.dirty:
            return False
        return self.env.server_db or self._writer is None or not self._writer.in_transaction()

    def _exists(self, s: Any, model: Any, ident: int) -> bool:
        return bool(self.d.rows(s, select(model.id).where(model.id == ident), NOCACHE))

    def _pick(self, model: Any, ident: int, held: bool) -> int:
        """``ident``, or with ``held`` one of the rows of ``model`` the writer holds (``ident`` picks),
        preferring those another session changed since: contended rows are where races are."""
        if held:
            idents = sorted(
                {inspect(o).identity[0] for o in self.held if type(o) is model and _persistent(o)}
            )
            contended = [i for i in idents if (model, i) in self.contended]
            choice = contended or idents
            if choice:
                return int(choice[ident % len(choice)])
        return ident

    def _wrote(self) -> None:
        self.env.steps += 1
        self.dirty = True  # uncommitted writes (maybe holding locks) until commit or rollback
        self._hold()

    def _hold(self) -> None:
        """Hold everything in the writer's (weak) identity map, as an application holding its objects
        would; it also keeps runs deterministic (the garbage collector doesn't decide what's there)."""
        if self._writer is not None:
            self.held = list(self._writer.identity_map.values())

    def _after_write(self, s: Any, flush: bool) -> None:
        self._wrote()
        if flush:
            self.d.flush(s)

    def _read(
        self, d: Any, s: Any, read: Read, cached: bool, keep: list[Any] | None = None
    ) -> tuple[Any, Any]:
        """Run ``read`` and return (normalised result, row identities), computed before anything else
        runs. ``keep`` collects the objects it returned, as an application holding them would."""
        opts: dict[str, Any] = {} if cached else dict(NOCACHE)
        held: list[Any] = keep if keep is not None else []
        if read.kind == "get":
            got = d.get(s, read.model, read.ident, opts)
            held.append(got)
            return _entity(got, read.rels), _ident(got)
        if read.kind == "rows":
            rows = d.rows(s, read.stmt, opts, read.unique)
            held.extend(v for r in rows for v in r if hasattr(v, "_sa_instance_state"))
            return [_norm(r, read.rels) for r in rows], [_ident(r) for r in rows]
        # lazy: the relationship load itself is what is cached; uncached, the equivalent SELECT
        if cached:

            def lazy(sync_session: Any) -> Any:
                user = sync_session.get(User, read.ident)
                if user is None:
                    return None
                held.append(user)
                return tuple(_entity(x, {}) for x in getattr(user, read.rel))

            return d.run_sync(s, lazy), None
        if d.get(s, User, read.ident, opts) is None:
            return None, None
        return tuple(_entity(r[0], {}) for r in d.rows(s, read.lazy_stmt(), opts)), None

    def _plain(self, read: Read) -> Any:
        with Session(self.env.plain_engine) as s:
            return self._read(_PLAIN, s, read, cached=False)[0]

    def _fail(self, where: str, read: Read, cached: Any, label: str, other: Any) -> None:
        raise AssertionError(
            f"[{self.env.name}] {where}: a cached read differs from the database\n"
            f"  read:      {read.label}\n"
            f"  statement: {read.sql()}\n"
            f"  cached:\n{_indent(pformat(cached, width=100))}\n"
            f"  {label}:\n{_indent(pformat(other, width=100))}"
        )

    def _reader_read(self, read: Read, other_cache: bool, twice: bool) -> None:
        self.seen.setdefault(read.label, read)
        factory = self.env.OtherSession if other_cache else self.env.Session
        truth = self._plain(read)
        for _ in range(2 if twice else 1):
            s = self.d.open(factory)
            try:
                got, _ = self._read(self.d, s, read, cached=True)
                s.expire_all()
                uncached, _ = self._read(self.d, s, read, cached=False)
            finally:
                self.d.close(s)
            self.env.compared += 1
            if got != truth:
                self._fail("reader session", read, got, "plain engine (committed truth)", truth)
            if uncached != truth:
                self._fail("reader session, uncached", read, uncached, "plain engine", truth)

    def _reader_sweep(self, reads: list[Read], other_cache: bool, where: str = "sweep") -> None:
        s = self.d.open(self.env.OtherSession if other_cache else self.env.Session)
        try:
            for read in reads:
                self.seen.setdefault(read.label, read)
                s.expire_all()  # one session: what an earlier read loaded must not mask this one
                got, _ = self._read(self.d, s, read, cached=True)
                truth = self._plain(read)
                self.env.compared += 1
                if got != truth:
                    self._fail(
                        f"reader session ({where})", read, got, "plain engine (committed truth)", truth
                    )
        finally:
            self.d.close(s)

    def _recheck(self, what: str) -> None:
        """After a commit: every statement read so far in this example (so possibly cached), and the
        sweep families (so that they are cached, with what this commit made current), again."""
        for reads in SWEEPS.values():
            for read in reads:
                self.seen.setdefault(read.label, read)
        self._reader_sweep(list(self.seen.values()), False, f"re-read after {what}")

    def _writer_read(self, read: Read, fresh: bool) -> None:
        """``fresh``: expire the session first, so values are compared too. Otherwise the session keeps
        what it holds (possibly older than the database, which is normal ORM behaviour), so only which
        rows come back (and column values, which don't go through objects) is compared."""
        self.seen.setdefault(read.label, read)
        s = self.writer()
        if not fresh:
            # With pending changes: the read autoflushes first.
            got_ids = self._read(self.d, s, read, cached=True, keep=self.held)[1]
            want_ids = self._read(self.d, s, read, cached=False, keep=self.held)[1]
            self.env.compared += 1
            if read.kind != "lazy" and got_ids != want_ids:
                self._fail(
                    "writer session (same transaction)", read, got_ids, "uncached, same session", want_ids
                )
            self._hold()
            return
        self.d.flush(s)
        s.expire_all()
        got, _ = self._read(self.d, s, read, cached=True, keep=self.held)
        s.expire_all()
        want, _ = self._read(self.d, s, read, cached=False, keep=self.held)
        self.env.compared += 1
        if got != want:
            self._fail("writer session (same transaction)", read, got, "uncached, same session", want)
        self._hold()

    @initialize(warm=st.booleans(), expire_on_commit=st.booleans())
    def start(self, warm: bool, expire_on_commit: bool) -> None:
        """``warm``: give every dependency a version now, as a running system has them. Otherwise each
        starts missing (as after ``invalidate_all``), and the first store that needs it is refused.
        ``expire_on_commit=False``: the writer keeps what it loaded across commits (and so may update
        objects that another session changed since)."""
        self.writer_options = {"expire_on_commit": expire_on_commit}
        if warm:
            self.d.invalidate(self.env.cache, tables=[t.name for t in Base.metadata.sorted_tables])
            for model, last in ((User, 6), (Order, 8), (Tag, 3)):
                self.d.invalidate(self.env.cache, model, pks=list(range(1, last + 1)))
            s = self.d.open(self.env.Session)
            try:
                self.d.rows(s, select(Tag.id), {})  # versions "*" (invalidate_all dropped it)
            finally:
                self.d.close(s)

    # -- reads ----------------------------------------------------------------------------

    @rule(read=ANY_READ, other_cache=st.booleans(), twice=st.booleans())
    def reader_read(self, read: Read, other_cache: bool, twice: bool) -> None:
        self._reader_read(read, other_cache, twice and read.kind != "lazy")

    @rule(sweep=st.sampled_from(sorted(SWEEPS)), other_cache=st.booleans())
    def reader_sweep(self, sweep: str, other_cache: bool) -> None:
        self._reader_sweep(SWEEPS[sweep], other_cache)

    @rule(read=ANY_READ, fresh=st.booleans())
    def writer_read(self, read: Read, fresh: bool) -> None:
        self._writer_read(read, fresh)

    # -- ORM writes -------------------------------------------------------------------------

    @rule(
        uid=UIDS,
        name=NAMES,
        active=st.booleans(),
        status=STATUSES,
        order=st.none() | st.tuples(OIDS, TOTALS),
        flush=st.booleans(),
    )
    def orm_insert_user(
        self, uid: int, name: str, active: bool, status: Status, order: tuple[int, int] | None, flush: bool
    ) -> None:
        s = self.writer()
        if self._exists(s, User, uid):
            return
        user = User(id=uid, name=name, active=active, status=status, token=uuid.UUID(int=uid))
        if order is not None and not self._exists(s, Order, order[0]):
            user.orders.append(Order(id=order[0], total=order[1]))
        s.add(user)
        self.held.append(user)
        self._after_write(s, flush)

    @rule(oid=OIDS, uid=UIDS, total=TOTALS, flush=st.booleans())
    def orm_insert_order(self, oid: int, uid: int, total: int, flush: bool) -> None:
        s = self.writer()
        if self._exists(s, Order, oid) or not self._exists(s, User, uid):
            return
        order = Order(id=oid, user_id=uid, total=total)
        s.add(order)
        self.held.append(order)
        self._after_write(s, flush)

    @rule(
        uid=UIDS,
        change=st.one_of(
            st.tuples(st.just("name"), NAMES),
            st.tuples(st.just("active"), st.booleans()),
            st.tuples(st.just("status"), STATUSES),
            st.tuples(st.just("balance"), BALANCES),
        ),
        held=st.booleans(),
        flush=st.booleans(),
    )
    def orm_update_user(self, uid: int, change: tuple[str, Any], held: bool, flush: bool) -> None:
        s = self.writer()
        # Through the cache, as an application would; a held object comes from the identity map.
        user = self.d.get(s, User, self._pick(User, uid, held), {})
        if user is None:
            return
        self.held.append(user)
        setattr(user, *change)
        self._after_write(s, flush)

    @rule(
        oid=OIDS,
        change=st.one_of(
            st.tuples(st.just("total"), TOTALS),
            st.tuples(st.just("user_id"), UIDS),  # moves the order to another user
            st.tuples(st.just("user"), UIDS),  # the same, through the relationship (and its backref)
        ),
        held=st.booleans(),
        flush=st.booleans(),
    )
    def orm_update_order(self, oid: int, change: tuple[str, int], held: bool, flush: bool) -> None:
        s = self.writer()
        oid = self._pick(Order, oid, held)
        what, value = change
        if what != "total" and not self._exists(s, User, value):
            return
        if what == "user":

            def move(sync_session: Any) -> None:
                order = sync_session.get(Order, oid)
                if order is not None:
                    order.user = sync_session.get(User, value)

            self.d.run_sync(s, move)
        else:
            order = self.d.get(s, Order, oid, {})
            if order is None:
                return
            self.held.append(order)
            setattr(order, what, value)
        self._after_write(s, flush)

    @rule(what=st.sampled_from(["user", "order", "orphan"]), ident=st.integers(1, 8), flush=st.booleans())
    def orm_delete(self, what: str, ident: int, flush: bool) -> None:
        s = self.writer()
        if what == "orphan":

            def orphan(sync_session: Any) -> None:
                user = sync_session.get(User, ident)
                if user is not None and user.orders:
                    user.orders.pop(0)  # delete-orphan

            self.d.run_sync(s, orphan)
        else:
            obj = self.d.get(s, User if what == "user" else Order, ident, {})
            if obj is None:
                return
            self.d.delete(s, obj)  # a user's orders and tag links go with it
            if what == "order":
                # The ORM leaves a deleted object in the collections that hold it (a later cascade
                # would delete it again): expire those, as an application should.
                for user in list(s.identity_map.values()):
                    if type(user) is User and obj in inspect(user).dict.get("orders", ()):
                        s.expire(user, ["orders"])
            if what == "user":
                # The ORM cascades to the orders it has loaded, the database (ON DELETE CASCADE) to
                # all of them: objects the session holds for rows the database removed are expired.
                self.d.flush(s)
                s.expire_all()
        self._after_write(s, flush)

    @rule(uid=UIDS, tid=TIDS, flush=st.booleans())
    def orm_toggle_tag(self, uid: int, tid: int, flush: bool) -> None:
        s = self.writer()

        def toggle(sync_session: Any) -> None:
            user, tag = sync_session.get(User, uid), sync_session.get(Tag, tid)
            if user is None or tag is None:
                return
            if tag in user.tags:
                user.tags.remove(tag)
            else:
                user.tags.append(tag)

        self.d.run_sync(s, toggle)
        self._after_write(s, flush)

    # -- bulk, Core and raw SQL writes ------------------------------------------------------

    @rule(
        op=st.one_of(
            st.tuples(
                st.just("update users"),
                st.one_of(
                    st.tuples(st.just("name"), NAMES),
                    st.tuples(st.just("id"), UIDS),
                    st.tuples(st.just("active"), st.booleans()),
                ),
                st.one_of(
                    st.fixed_dictionaries({"name": NAMES}),
                    st.fixed_dictionaries({"active": st.booleans()}),
                    st.fixed_dictionaries({"status": STATUSES}),
                    st.fixed_dictionaries({"balance": BALANCES}),
                ),
            ),
            st.tuples(
                st.just("update orders"),
                st.one_of(
                    st.tuples(st.just("total"), TOTALS),
                    st.tuples(st.just("user_id"), UIDS),
                    st.tuples(st.just("id"), OIDS),
                ),
                st.one_of(st.fixed_dictionaries({"total": TOTALS}), st.fixed_dictionaries({"user_id": UIDS})),
            ),
            st.tuples(
                st.just("delete"),
                st.one_of(
                    st.tuples(st.just("order.total"), TOTALS),
                    st.tuples(st.just("order.user_id"), UIDS),
                    st.tuples(st.just("user.id"), UIDS),  # the database cascades to orders and tag links
                    st.tuples(st.just("user.name"), NAMES),
                ),
                st.none(),
            ),
        ),
        sync=st.sampled_from(["auto", "fetch", False]),
    )
    def bulk_dml(self, op: tuple[str, tuple[str, Any], dict[str, Any] | None], sync: Any) -> None:
        """ORM bulk UPDATE/DELETE ... WHERE, with each synchronize_session strategy."""
        s = self.writer()
        kind, (column, value), values = op
        stmt: Any
        if kind == "update users":
            cond = User.active.is_(value) if column == "active" else getattr(User, column) == value
            stmt = update(User).where(cond).values(**(values or {}))
        elif kind == "update orders":
            assert values is not None
            if "user_id" in values and not self._exists(s, User, values["user_id"]):
                return
            stmt = update(Order).where(getattr(Order, column) == value).values(**values)
        else:
            table, _, column = column.partition(".")
            model = User if table == "user" else Order
            stmt = delete(model).where(getattr(model, column) == value)
        self.d.execute(s, stmt, opts={"synchronize_session": sync})
        if kind == "delete":
            # Objects for rows gone behind the ORM's back (synchronize_session=False, the database's
            # ON DELETE CASCADE) would make later ORM writes fail: expire them. Updated rows are left
            # as they are in memory (with synchronize_session=False, older than the database).
            s.expire_all()
        self._wrote()

    @rule(oid=OIDS, uid=UIDS, total=TOTALS, orm_entity=st.booleans())
    def core_insert_order(self, oid: int, uid: int, total: int, orm_entity: bool) -> None:
        s = self.writer()
        if self._exists(s, Order, oid) or not self._exists(s, User, uid):
            return
        target = Order if orm_entity else Order.__table__
        self.d.execute(s, insert(target).values(id=oid, user_id=uid, total=total))
        self._wrote()

    @rule(
        sql=st.sampled_from(
            [
                ("UPDATE users SET name = :v WHERE id = :id", "name"),
                ("UPDATE users SET active = :v WHERE id = :id", "bool"),
                ("UPDATE orders SET total = :v WHERE id = :id", "total"),
                ("UPDATE orders SET user_id = :v WHERE id = :id", "user"),
                ("DELETE FROM orders WHERE id = :id", None),
                ("DELETE FROM user_tags WHERE user_id = :id", None),
                ("INSERT INTO orders (id, user_id, total) VALUES (:id, :v, 1)", "user"),
            ]
        ),
        ident=st.integers(1, 8),
        name=NAMES,
        number=st.integers(0, 6),
    )
    def raw_sql(self, sql: tuple[str, str | None], ident: int, name: str, number: int) -> None:
        s = self.writer()
        self.d.flush(s)  # text() doesn't autoflush
        statement, kind = sql
        params: dict[str, Any] = {"id": ident}
        if kind == "name":
            params["v"] = name
        elif kind == "bool":
            params["v"] = number % 2 == 0
        elif kind == "total":
            params["v"] = number % 4
        elif kind == "user":
            params["v"] = number
            if not self._exists(s, User, number):
                return
        if statement.startswith("INSERT") and self._exists(s, Order, ident):
            return
        self.d.execute(s, text(statement), params)
        if statement.startswith("DELETE"):
            s.expire_all()  # as for bulk deletes; after an UPDATE, the session's copies are just older
        elif statement.startswith("UPDATE"):
            self.contended.add((User if "users" in statement else Order, ident))
        self._wrote()

    def _other_request(self, change: tuple[str, int, str, Any], held: bool, other_cache: bool) -> None:
        """Another request (or, with ``other_cache``, another process) updates a row and commits. With
        ``held``, a row the writer holds (``ident`` picks which), which makes the writer's copy old."""
        model_name, ident, column, value = change
        model = User if model_name == "User" else Order
        s = self.d.open(self.env.OtherSession if other_cache else self.env.Session)
        try:
            ident = self._pick(model, ident, held)
            obj = self.d.get(s, model, ident, {})
            if obj is not None and (column != "user_id" or self._exists(s, User, value)):
                setattr(obj, column, value)
                self.d.commit(s)
                self.env.steps += 1
                self.contended.add((model, ident))
        finally:
            self.d.close(s)
        self._recheck("another session's commit")

    @precondition(lambda self: self._may_write_elsewhere())
    @rule(change=OTHER_CHANGES, held=st.booleans(), other_cache=st.booleans())
    def other_request_update(self, change: tuple[str, int, str, Any], held: bool, other_cache: bool) -> None:
        self._other_request(change, held, other_cache)

    # -- transaction control ----------------------------------------------------------------

    @rule(
        close=st.booleans(),
        then=st.none() | st.tuples(OTHER_CHANGES, st.booleans(), st.booleans()),
    )
    def commit(self, close: bool, then: tuple[tuple[str, int, str, Any], bool, bool] | None) -> None:
        """``then``: another request's write right after this one (change, held, other_cache)."""
        s = self.writer()
        self.d.commit(s)
        self.savepoints.clear()
        self.dirty = False
        if close:
            self.teardown()
        self._recheck("the writer's commit")
        if then is not None:
            self._other_request(*then)

    @rule(close=st.booleans())
    def rollback(self, close: bool) -> None:
        s = self.writer()
        self.d.rollback(s)
        self.savepoints.clear()
        self.dirty = False
        if close:
            self.teardown()

    @precondition(lambda self: len(self.savepoints) < 2)
    @rule()
    def begin_savepoint(self) -> None:
        self.savepoints.append(self.d.begin_nested(self.writer()))

    @precondition(lambda self: bool(self.savepoints))
    @rule(release=st.booleans())
    def end_savepoint(self, release: bool) -> None:
        self.d.end_nested(self.savepoints.pop(), release)
        if not release:
            # The ORM can keep objects for rows the rollback removed (flushed inside the savepoint):
            # start again from the database, as an application recovering from the rollback would.
            self.writer().expunge_all()
            self.held.clear()


_PLAIN = SyncDriver()


def _indent(text_: str) -> str:
    return "\n".join("      " + line for line in text_.splitlines())


def test_cached_reads_always_match_the_database(oracle_env: Env) -> None:
    env = oracle_env
    config = settings(max_examples=_examples(env.name), stateful_step_count=_STEPS[env.name], deadline=None)
    started = time.perf_counter()
    run_state_machine_as_test(lambda: CacheOracle(env), settings=config)
    elapsed = time.perf_counter() - started
    stats, other = env.cache.stats(), env.other_cache.stats()
    hits = env.hits()
    print(
        f"\n[{env.name}] {env.examples} examples, {env.steps} writes, {env.compared} compared reads, "
        f"{hits} hits ({stats['misses'] + other['misses']} misses, {stats['stores'] + other['stores']} "
        f"stores, {stats['stores_refused'] + other['stores_refused']} refused) in {elapsed:.1f}s"
    )
    # A run where the cache never answers proves nothing.
    assert env.compared >= 5 * env.examples
    assert hits >= 3 * env.examples, f"only {hits} cache hits in {env.examples} examples: {stats}, {other}"
    # sqlacache survives its own bugs by going to the database; here they must not happen at all.
    assert not stats.get("errors.internal") and not other.get("errors.internal"), (stats, other)
    if env.cache.near is not None:  # and in a near world, process memory answered some of them
        near_hits = stats["near_hits"] + other["near_hits"]
        assert near_hits >= env.examples, f"only {near_hits} near hits: {stats}, {other}"
