"""Stampedes: many readers of one key that is not cached run its query once, not once each."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time

import pytest
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession
from tests.conftest import _pg_schema_url
from tests.helpers import acached, aseed, cached, seed, until
from tests.models import User

READERS = 50


def _by_name(name):
    return select(User).where(User.name == name)


def _user_selects(world, since):
    return sum(1 for q in world.sql[since:] if q.lstrip().upper().startswith("SELECT") and "users" in q)


def _warm_metadata(world):
    """A reader of the same table and condition shape once, so that the key under test is cold but
    the table's dependency versions exist (a never-seen table's first store is refused by design)."""
    cached(world, lambda s: [u.name for u in s.scalars(_by_name("u1"))])


def test_concurrent_misses_in_one_process_query_once(world):
    seed(world)
    _warm_metadata(world)
    before = world.statements()
    barrier = threading.Barrier(READERS)
    results, errors = [], []

    def read():
        try:
            with world.Session() as s:
                barrier.wait()
                results.append([u.name for u in s.scalars(_by_name("u2"))])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == [["u2"]] * READERS
    assert _user_selects(world, before) == 1


def test_concurrent_gets_in_one_process_query_once(world):
    seed(world)
    cached(world, lambda s: s.get(User, 1).name)
    before = world.statements()
    barrier = threading.Barrier(READERS)
    names = []

    def read():
        with world.Session() as s:
            barrier.wait()
            names.append(s.get(User, 3).name)

    threads = [threading.Thread(target=read) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert names == ["u3"] * READERS
    assert _user_selects(world, before) == 1, world.cache.stats()


def test_a_cold_start_costs_a_few_queries_not_one_per_reader(world):
    """Nothing cached, no metadata: each refused store costs one more query, by one new leader."""
    seed(world)
    before = world.statements()
    barrier = threading.Barrier(READERS)

    def read():
        with world.Session() as s:
            barrier.wait()
            assert [u.name for u in s.scalars(_by_name("u3"))] == ["u3"]

    threads = [threading.Thread(target=read) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    queries = _user_selects(world, before)
    print(f"cold start, {READERS} readers, {world.name}: {queries} queries")
    assert 1 <= queries <= 4


async def test_concurrent_misses_in_tasks_query_once(aworld):
    await aseed(aworld)

    async def read_u1(s):
        return [u.name for u in (await s.scalars(_by_name("u1"))).all()]

    await acached(aworld, read_u1)
    before = aworld.statements()

    async def read():
        async with aworld.Session() as s:
            return [u.name for u in (await s.scalars(_by_name("u2"))).all()]

    results = await asyncio.gather(*(read() for _ in range(READERS)))
    assert results == [["u2"]] * READERS
    assert _user_selects(aworld, before) == 1


async def test_concurrent_gets_in_tasks_query_once(aworld):
    await aseed(aworld)

    async def get_1(s):
        return (await s.get(User, 1)).name

    await acached(aworld, get_1)
    before = aworld.statements()

    async def read():
        async with aworld.Session() as s:
            return (await s.get(User, 2)).name

    assert await asyncio.gather(*(read() for _ in range(READERS))) == ["u2"] * READERS
    assert _user_selects(aworld, before) == 1


def test_a_waiting_reader_gives_up_after_fill_timeout(world):
    """The leader's query hangs: the others wait fill_timeout, then read the database themselves."""
    seed(world)
    _warm_metadata(world)
    cache = world.make_cache(prefix=world.cache.prefix, fill_timeout=0.3)
    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)
    release = threading.Event()
    hung = threading.Event()

    @event.listens_for(world.engine, "after_cursor_execute")
    def hang(conn, cursor, statement, *args):
        if "users" in statement and threading.current_thread().name == "leader":
            hung.set()
            release.wait(10)

    def leader():
        with Session() as s:
            s.scalars(_by_name("u2")).all()

    t = threading.Thread(target=leader, name="leader")
    t.start()
    try:
        assert hung.wait(10)
        started = time.monotonic()
        with Session() as s:
            assert [u.name for u in s.scalars(_by_name("u2"))] == ["u2"]
        waited = time.monotonic() - started
        assert 0.25 <= waited < 5  # it waited for the leader, boundedly
    finally:
        release.set()
        t.join(10)
        event.remove(world.engine, "after_cursor_execute", hang)
        cache.close()


# -- across processes -------------------------------------------------------------------------


def _process_readers(db_url, schema, redis_url, prefix, warm, start, out):
    """One process: READERS threads read one key at once; reports how many queries it ran.

    ``warm``: the process has run the statement's shape before (with another value), as a process
    serving traffic has; a fresh one has not (it rebuilds results of the shape all the same)."""
    url, args = _pg_schema_url(db_url, schema)
    engine = create_engine(url, connect_args=args, pool_size=5, max_overflow=0)
    queries = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: queries.append(stmt))
    # 4 x 50 threads on a 2-core machine stall a process for longer than the default 50 ms socket
    # timeout: that is this test's load, not a Redis outage, which other tests cover.
    cache = Cache(backend=redis_url, prefix=prefix, socket_timeout=1.0)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    barrier = threading.Barrier(READERS)
    names = []

    def read():
        with Session() as s:
            barrier.wait()
            names.append([u.name for u in s.scalars(_by_name("u2"))])

    if warm:
        with Session() as s:
            s.scalars(_by_name("u3")).all()
    del queries[:]
    start.wait(30)
    threads = [threading.Thread(target=read) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    selects = sum(1 for q in queries if q.lstrip().upper().startswith("SELECT") and "users" in q)
    ok = names == [["u2"]] * READERS
    out.put((os.getpid(), selects, ok, cache.stats()))
    cache.close()
    engine.dispose()


@pytest.mark.parametrize("warm", [True, False], ids=["warm-processes", "fresh-processes"])
def test_four_processes_of_concurrent_readers_query_a_handful_of_times(
    pg_sync_url, pg_schema, redis_url, warm
):
    prefix = f"sqlacache-stampede-{os.getpid()}-{time.time_ns()}"
    url, args = _pg_schema_url(pg_sync_url, pg_schema)
    engine = create_engine(url, connect_args=args)
    from tests.conftest import _truncate_sync

    _truncate_sync(engine)
    cache = Cache(backend=redis_url, prefix=prefix)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in (1, 2, 3)])
        s.commit()
    for _ in range(2):  # the table's metadata exists; the key under test is cold
        with Session() as s:
            s.scalars(_by_name("u1")).all()
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_process_readers,
            args=(pg_sync_url, pg_schema, redis_url, prefix, warm, start, out),
        )
        for _ in range(4)
    ]
    try:
        for p in procs:
            p.start()
        time.sleep(0.5)
        start.set()
        reports = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        cache.invalidate_all()
        cache.close()
        engine.dispose()
    assert all(ok is True for _, _, ok, _ in reports), reports
    total = sum(n for _, n, _, _ in reports)
    kind = "warm" if warm else "fresh"
    print(
        f"4 {kind} processes x {READERS} readers of one cold key: {total} queries",
        [n for _, n, _, _ in reports],
    )
    assert all(n <= 1 for _, n, _, _ in reports), reports
    assert total == 1


def _die_holding_the_lease(redis_url, prefix, db_path, ready):
    """Lead the fill of a key, take its lease, and die in the middle of the query."""
    engine = create_engine(f"sqlite:///{db_path}")
    cache = Cache(backend=redis_url, prefix=prefix, fill_timeout=1.0)

    @event.listens_for(engine, "before_cursor_execute")
    def die(conn, cursor, statement, *args):
        if "users" in statement and "name" in statement.lower() and "WHERE" in statement.upper():
            ready.set()
            os._exit(3)

    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        s.scalars(_by_name("u2")).all()


def test_a_lease_holder_that_dies_blocks_nobody_past_the_lease(tmp_path, redis_url, key_prefix):
    from tests.models import Base

    db_path = tmp_path / "lease.db"
    engine = create_engine(f"sqlite:///{db_path}")
    Base.metadata.create_all(engine)
    cache = Cache(backend=redis_url, prefix=key_prefix, fill_timeout=1.0)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in (1, 2)])
        s.commit()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_die_holding_the_lease, args=(redis_url, key_prefix, db_path, ready))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3 and ready.is_set()  # it died holding the lease
    started = time.monotonic()
    with Session() as s:
        assert [u.name for u in s.scalars(_by_name("u2"))] == ["u2"]
    waited = time.monotonic() - started
    stats = cache.stats()
    cache.invalidate_all()
    cache.close()
    assert stats["lease_waits"] == 1
    assert waited < 5  # bounded by the lease (1 s), not by the dead holder


# -- refresh-ahead ----------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["get", "list"])
def test_refresh_ahead_refreshes_once_while_readers_are_served(world, read):
    seed(world)
    cache = world.make_cache(prefix=world.cache.prefix, refresh_ahead=0.6, default_ttl=1.5)
    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)

    def do_read(s):
        if read == "get":
            return s.get(User, 2).name
        return [u.name for u in s.scalars(_by_name("u2"))]

    for _ in range(3):
        with Session() as s:
            do_read(s)
    time.sleep(0.7)  # inside the last 60% of the TTL: due
    before = world.statements()
    barrier = threading.Barrier(10)
    values = []

    def reader():
        with Session() as s:
            barrier.wait()
            values.append(do_read(s))

    threads = [threading.Thread(target=reader) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    deadline = time.monotonic() + 5
    while _user_selects(world, before) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(values) == 10 and len(set(map(str, values))) == 1
    assert _user_selects(world, before) == 1  # one background refresh, nobody waited on it
    assert cache.stats()["refreshes"] == 1
    time.sleep(1.0)  # past the first entry's TTL: the refreshed one serves (and may be due again)
    misses = cache.stats()["misses"]
    with Session() as s:
        do_read(s)
    assert cache.stats()["misses"] == misses
    with Session() as s:  # a commit still evicts a due entry
        s.get(User, 2).name = "renamed"
        s.commit()
    with Session() as s:
        assert do_read(s) in ("renamed", ["renamed"], [])
    cache.close()


@pytest.mark.parametrize("kind", ["get", "list"])
async def test_async_refresh_ahead(aworld, kind):
    await aseed(aworld)
    cache = aworld.make_cache(prefix=aworld.cache.prefix, refresh_ahead=0.6, default_ttl=1.5)
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from sqlacache import CachingAsyncSession

    Session = async_sessionmaker(aworld.engine, class_=CachingAsyncSession, cache=cache)

    async def read():
        async with Session() as s:
            if kind == "get":
                return (await s.get(User, 2)).name
            return [u.name for u in (await s.scalars(_by_name("u2"))).all()]

    expected = "u2" if kind == "get" else ["u2"]
    for _ in range(3):
        assert await read() == expected
    await asyncio.sleep(0.7)
    before = aworld.statements()
    assert await asyncio.gather(*(read() for _ in range(10))) == [expected] * 10
    await cache.await_for_stores()
    for _ in range(100):
        if _user_selects(aworld, before):
            break
        await asyncio.sleep(0.02)
    await cache.await_for_stores()
    assert _user_selects(aworld, before) == 1
    assert cache.stats()["refreshes"] == 1
    await asyncio.sleep(1.0)  # past the first entry's TTL: the refreshed one serves
    misses = cache.stats()["misses"]
    assert await read() == expected
    assert cache.stats()["misses"] == misses
    await cache.aclose()


def test_a_refresh_runs_in_the_readers_context(world):
    """Hooks that read contextvars (a tenant, a request id) see the same values in the refresh."""
    import contextvars

    tenant = contextvars.ContextVar("tenant", default=None)
    seen = []
    seed(world)
    cache = world.make_cache(prefix=world.cache.prefix, refresh_ahead=0.9, default_ttl=2)
    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)

    @event.listens_for(world.engine, "before_cursor_execute")
    def record(conn, cursor, statement, *args):
        if "users" in statement:
            seen.append(tenant.get())

    try:
        tenant.set("acme")
        for _ in range(3):
            with Session() as s:
                s.get(User, 1)
        time.sleep(0.3)  # due after 10% of the TTL
        del seen[:]
        with Session() as s:
            s.get(User, 1)
        assert until(lambda: seen, timeout=5)
        assert seen == ["acme"]
    finally:
        event.remove(world.engine, "before_cursor_execute", record)
        cache.close()


async def test_sync_code_on_the_event_loop_never_blocks_waiting_for_a_task(tmp_path):
    """A sync session used on an event loop's thread must not wait for a leader that is a task of
    that loop: the loop could not run the leader while it waits."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.util.concurrency import await_only

    from sqlacache import CachingAsyncSession
    from tests.models import Base

    path = tmp_path / "loop.db"
    sync_engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync_engine)
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    cache = Cache(prefix="loop")
    ASession = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache)
    SSession = sessionmaker(sync_engine, class_=CachingSession, cache=cache)
    with SSession() as s:
        s.add(User(id=1, name="u1"))
        s.commit()
    started = asyncio.Event()

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def slow(conn, cursor, statement, *args):
        if "users" in statement:
            started.set()
            await_only(asyncio.sleep(0.5))

    async def leader():
        async with ASession() as s:
            return [u.name for u in (await s.scalars(_by_name("u1"))).all()]

    task = asyncio.create_task(leader())
    await started.wait()
    t = time.monotonic()
    with SSession() as s:  # sync, on the loop's thread, same key
        assert [u.name for u in s.scalars(_by_name("u1"))] == ["u1"]
    blocked = time.monotonic() - t
    assert await task == ["u1"]
    assert blocked < 0.4  # it went to the database instead of waiting for the task
    await engine.dispose()
    sync_engine.dispose()
