"""``Cache.memoize``: results of functions, evicted by commits to the tables they name.

Against the memory backend and the real Redis, sync and async; a commit through another Cache on the
same Redis (another process looks like that) evicts; a commit landing between the function's read
and its store never leaves the older value behind (inline, and from another thread).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, create_engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlacache import Cache, CachingSession, ConfigurationError


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "memo_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


class Pet(Base):
    __tablename__ = "memo_pets"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[int]


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'memo.db'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    else:
        yield request.getfixturevalue("redis_url")


@pytest.fixture
def make_cache(backend: str, key_prefix: str) -> Iterator[Any]:
    made: list[Cache] = []

    def make(**kw: Any) -> Cache:
        cache = Cache(backend=kw.pop("backend", backend), prefix=key_prefix, **kw)
        made.append(cache)
        return cache

    yield make
    if made:
        made[0].invalidate_all()
    for cache in made:
        cache.close()


def add_person(engine: Any, pid: int, name: str, cache: Cache | None = None) -> None:
    with CachingSession(engine, cache=cache) if cache is not None else Session(engine) as s:
        s.add(Person(id=pid, name=name))
        s.commit()


def test_commit_to_a_dependency_evicts(db: str, make_cache: Any) -> None:
    engine = create_engine(db)
    cache = make_cache()
    calls: list[str] = []

    @cache.memoize(depends_on=[Person], bind=engine)
    def names(prefix: str, limit: int = 10) -> list[str]:
        calls.append(prefix)
        with Session(engine) as s:
            return list(s.scalars(select(Person.name).where(Person.name.startswith(prefix)).limit(limit)))

    assert names("a") == [] and names("a") == [] and names(prefix="a", limit=10) == []
    assert calls == ["a"]  # positional, keyword and default spellings share one key
    add_person(engine, 1, "ann")  # a plain session: the engine is watched through bind=
    assert names("a") == ["ann"] and names("a") == ["ann"]
    assert calls == ["a", "a"]
    assert names("b") == [] and calls == ["a", "a", "b"]  # other arguments, another entry
    stats = cache.stats()
    assert (stats["memoize_hits"], stats["memoize_misses"]) == (3, 3)


def test_commit_to_another_table_keeps_it(db: str, make_cache: Any) -> None:
    engine = create_engine(db)
    cache = make_cache()
    calls: list[int] = []

    @cache.memoize(depends_on=["memo_people"], bind=engine)
    def total() -> int:
        calls.append(1)
        with Session(engine) as s:
            return s.scalar(select(func.count()).select_from(Person)) or 0

    assert total() == 0
    with Session(engine) as s:
        s.add(Pet(id=1, owner=1))
        s.commit()
    assert total() == 0 and len(calls) == 1


def test_values_round_trip_exactly(db: str, make_cache: Any) -> None:
    cache = make_cache()
    value = {"d": date(2024, 2, 29), "n": Decimal("1.50"), "t": (1, "x", None), "b": b"\x00", "f": 0.1}

    @cache.memoize(depends_on=[Person])
    def compute() -> dict[str, Any]:
        return dict(value)

    first, second = compute(), compute()
    assert first == second == value
    assert type(second["t"]) is tuple and str(second["n"]) == "1.50"
    assert cache.stats()["memoize_hits"] == 1


def test_another_cache_on_the_same_redis_evicts(db: str, redis_url: str, key_prefix: str) -> None:
    """Process A memoizes; process B (a second Cache and engine on the same Redis and database)
    commits through its caching session: A's next call recomputes."""
    engine_a, engine_b = create_engine(db), create_engine(db)
    a = Cache(backend=redis_url, prefix=key_prefix)
    b = Cache(backend=redis_url, prefix=key_prefix)
    try:
        calls: list[int] = []

        @a.memoize(depends_on=[Person], bind=engine_a)
        def count() -> int:
            calls.append(1)
            with CachingSession(engine_a, cache=a) as s:
                return s.scalar(select(func.count()).select_from(Person)) or 0

        assert count() == 0 and count() == 0 and len(calls) == 1
        add_person(engine_b, 1, "bob", cache=b)
        assert count() == 1 and len(calls) == 2
    finally:
        a.invalidate_all()
        a.close()
        b.close()


def test_a_commit_while_the_function_computes_is_not_lost(db: str, make_cache: Any) -> None:
    """The function read the old state, then a commit landed before its store: the store is
    refused, the caller gets what it computed, and the next call reads the new state."""
    engine = create_engine(db)
    cache, other = make_cache(), make_cache()
    commit_during = [True]

    @cache.memoize(depends_on=[Person], bind=engine)
    def count() -> int:
        with Session(engine) as s:
            n = s.scalar(select(func.count()).select_from(Person)) or 0
        if commit_during[0]:
            commit_during[0] = False
            add_person(create_engine(db), 1, "eve", cache=other)  # lands after the read
        return n

    assert count() == 0  # what it read
    assert cache.stats()["stores_refused"] == 1
    assert count() == 1 and count() == 1  # recomputed, then served


def test_a_commit_from_another_thread_during_the_compute(db: str, make_cache: Any) -> None:
    engine = create_engine(db)
    cache = make_cache()
    read, committed = threading.Event(), threading.Event()

    @cache.memoize(depends_on=[Person], bind=engine)
    def count() -> int:
        with Session(engine) as s:
            n = s.scalar(select(func.count()).select_from(Person)) or 0
        read.set()
        assert committed.wait(10)
        return n

    def writer() -> None:
        assert read.wait(10)
        add_person(engine, 1, "zed")
        committed.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert count() == 0
    thread.join()
    committed.clear()
    read.clear()
    committed.set()  # nothing else to wait for now
    assert count() == 1


async def test_async_function(tmp_path: Path, make_cache: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'amemo.db'}"
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    cache = make_cache()
    calls: list[int] = []

    @cache.memoize(depends_on=[Person], bind=engine)
    async def count(name: str) -> int:
        calls.append(1)
        async with AsyncSession(engine) as s:
            return (await s.scalar(select(func.count()).where(Person.name == name))) or 0

    assert await count("amy") == 0 and await count("amy") == 0 and len(calls) == 1
    async with AsyncSession(engine) as s:
        s.add(Person(id=1, name="amy"))
        await s.commit()
    assert await count("amy") == 1 and await count("amy") == 1 and len(calls) == 2
    await engine.dispose()


def test_raw_sql_the_cache_cannot_read_evicts(db: str, make_cache: Any) -> None:
    engine = create_engine(db)
    cache = make_cache()

    @cache.memoize(depends_on=[Person], bind=engine)
    def count() -> int:
        with Session(engine) as s:
            return s.scalar(select(func.count()).select_from(Person)) or 0

    assert count() == 0
    with engine.begin() as conn:  # a statement whose tables sqlacache can't name
        conn.exec_driver_sql("WITH x AS (SELECT 1) INSERT INTO memo_people SELECT 5, 'q' FROM x")
    assert count() == 1


def test_without_bind_the_database_is_learnt_from_the_functions_sessions(db: str, make_cache: Any) -> None:
    """No ``bind=``: the first call's CachingSession makes the cache watch the database; that call's
    result isn't stored (its entry would miss the database's dependency), the next one's is, and
    raw SQL the cache can't read evicts it."""
    engine = create_engine(db)
    cache = make_cache()
    calls: list[int] = []

    @cache.memoize(depends_on=[Person])
    def count() -> int:
        calls.append(1)
        with CachingSession(engine, cache=cache) as s:
            return s.scalar(select(func.count()).select_from(Person)) or 0

    assert [count(), count(), count()] == [0, 0, 0] and len(calls) == 2
    with engine.begin() as conn:
        conn.exec_driver_sql("WITH x AS (SELECT 1) INSERT INTO memo_people SELECT 5, 'q' FROM x")
    assert count() == 1 and len(calls) == 3


def test_ttl_expires(make_cache: Any) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cache.memoize(depends_on=[Person], ttl=0.3)
    def one() -> int:
        calls.append(1)
        return 1

    one(), one()
    assert len(calls) == 1
    time.sleep(0.5)
    one()
    assert len(calls) == 2


def test_disabled_cache_and_down_backend_call_through(db: str, key_prefix: str) -> None:
    calls: list[int] = []
    for cache in (
        Cache(enabled=False),
        Cache(backend="redis://127.0.0.1:1/0", prefix=key_prefix, socket_timeout=0.05),
    ):

        @cache.memoize(depends_on=[Person])
        def one() -> int:
            calls.append(1)
            return 1

        assert one() == 1 and one() == 1
        cache.close()
    assert len(calls) == 4


def test_refused_types_are_named_clearly(make_cache: Any) -> None:
    cache = make_cache()
    with pytest.raises(ConfigurationError, match=r"result is annotated Person.*return their ids"):

        @cache.memoize(depends_on=[Person])
        def person() -> Person: ...

    with pytest.raises(ConfigurationError, match=r"argument 'when' is annotated .*object"):

        @cache.memoize(depends_on=[Person])
        def f(when: object) -> int: ...

    with pytest.raises(ConfigurationError, match=r"dict keys must be str"):

        @cache.memoize(depends_on=[Person])
        def g() -> dict[int, str]: ...

    with pytest.raises(ConfigurationError, match=r"result is annotated .*Iterator"):

        @cache.memoize(depends_on=[Person])
        def gen() -> Iterator[int]:
            yield 1

    # What a list, tuple or str-keyed dict satisfies is accepted; the values are checked when called.
    @cache.memoize(depends_on=[Person])
    def fine(a: int | None, b: Sequence[str] = (), c: Mapping[str, Decimal] | None = None) -> tuple[int, ...]:
        return (1, 2)

    assert fine(None) == fine(None) == (1, 2)

    @cache.memoize(depends_on=[Person])
    def h(x: Any) -> Any:
        return x

    assert h([1, (2, "3")]) == [1, (2, "3")]
    with pytest.raises(ConfigurationError, match=r"argument can't be part of a cache key.*set"):
        h({1})

    @cache.memoize(depends_on=[Person])
    def k() -> Any:
        return {1, 2}

    with pytest.raises(ConfigurationError, match=r"returned a value the cache can't encode.*set"):
        k()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"depends_on": Person}, "give a list of mapped classes"),
        ({"depends_on": "memo_people"}, "give a list of mapped classes"),
        ({"depends_on": []}, "depends_on is empty"),
        ({"depends_on": [object()]}, "is not a mapped class, a Table or a table name"),
        ({"depends_on": [Person], "ttl": -1}, "ttl"),
        ({"depends_on": [Person], "bind": "sqlite://"}, "is not an Engine"),
    ],
)
def test_wrong_configuration(kw: dict[str, Any], message: str) -> None:
    cache = Cache()
    with pytest.raises(ConfigurationError, match=message):
        cache.memoize(**kw)
    cache.close()


def test_on_postgres_through_a_caching_session(pg_sync_url: str, redis_url: str, key_prefix: str) -> None:
    table = f"memo_{uuid.uuid4().hex[:8]}"
    engine = create_engine(pg_sync_url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id int primary key)"))
    cache = Cache(backend=redis_url, prefix=key_prefix)
    try:

        @cache.memoize(depends_on=[table], bind=engine)
        def count() -> int:
            with CachingSession(engine, cache=cache) as s:
                return int(s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())

        assert count() == 0 and count() == 0
        with CachingSession(engine, cache=cache) as s:
            s.execute(text(f"INSERT INTO {table} VALUES (1)"))
            s.commit()
        assert count() == 1
        assert cache.stats()["memoize_hits"] == 1
    finally:
        cache.invalidate_all()
        cache.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


def test_concurrent_callers_wait_for_one_compute(backend: str, key_prefix: str) -> None:
    """Eight threads (on two Caches: two processes, on Redis) call a slow function at once: it runs
    once, and every caller gets its result."""
    caches = [Cache(backend=backend, prefix=key_prefix) for _ in range(2 if backend != "memory://" else 1)]
    calls: list[int] = []
    lock = threading.Lock()
    functions = []
    for cache in caches:

        @cache.memoize(depends_on=[Person])
        def slow(n: int) -> int:
            with lock:
                calls.append(n)
            time.sleep(0.3)
            return n * 2

        functions.append(slow)
    start = threading.Barrier(8)
    results: list[int] = []

    def caller(i: int) -> None:
        start.wait()
        value = functions[i % len(functions)](21)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [42] * 8
        assert calls == [21]
    finally:
        caches[0].invalidate_all()
        for cache in caches:
            cache.close()


def test_a_failing_function_lets_the_next_caller_compute(make_cache: Any) -> None:
    cache = make_cache()
    outcomes = iter([ValueError("boom"), 7])

    @cache.memoize(depends_on=[Person])
    def flaky() -> int:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with pytest.raises(ValueError, match="boom"):
        flaky()
    assert flaky() == 7 and flaky() == 7


async def test_concurrent_tasks_wait_for_one_compute(make_cache: Any) -> None:
    import asyncio

    cache = make_cache()
    calls: list[int] = []

    @cache.memoize(depends_on=[Person])
    async def slow(n: int) -> int:
        calls.append(n)
        await asyncio.sleep(0.3)
        return n + 1

    assert await asyncio.gather(*[slow(1) for _ in range(8)]) == [2] * 8
    assert calls == [1]


def test_on_a_redis_cluster(db: str, redis_cluster: Any, key_prefix: str) -> None:
    """The cluster backend (groups per table, stripes for the global deps): a commit evicts, and a
    commit during the compute makes the store refused."""
    engine = create_engine(db)
    cache, other = (Cache(backend=redis_cluster.url, prefix=key_prefix) for _ in range(2))
    try:
        commit_during = [False]
        calls: list[int] = []

        @cache.memoize(depends_on=[Person], bind=engine)
        def count() -> int:
            calls.append(1)
            with Session(engine) as s:
                n = s.scalar(select(func.count()).select_from(Person)) or 0
            if commit_during[0]:
                commit_during[0] = False
                add_person(create_engine(db), 2, "kim", cache=other)
            return n

        assert count() == 0 and count() == 0 and len(calls) == 1
        add_person(engine, 1, "jo")
        commit_during[0] = True
        assert count() == 1  # read before the commit it made land: returned, not stored
        assert count() == 2 and count() == 2 and len(calls) == 3
    finally:
        cache.invalidate_all()
        cache.close()
        other.close()
