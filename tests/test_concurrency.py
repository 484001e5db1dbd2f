"""The stale-set race, with real threads and tasks: a reader that read the database before a commit
must not store what it read after the commit's invalidation."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.util.concurrency import await_only

from sqlacache import CachingSession
from tests.helpers import aseed, seed
from tests.models import User

# Freshness: also in the near-cache worlds (conftest.py).
pytestmark = [pytest.mark.near_worlds, pytest.mark.cluster_worlds]


def _pause_after_first_select(engine, reached, resume, wait):
    """Block the next SELECT on users right after the database answered it."""
    armed = {"on": True}

    @event.listens_for(engine, "after_cursor_execute")
    def _(conn, cursor, statement, params, context, executemany):
        if armed["on"] and statement.lstrip().upper().startswith("SELECT") and "users" in statement:
            armed["on"] = False
            reached.set()
            wait(resume)

    return armed


@pytest.mark.parametrize("read", ["get", "list"])
def test_reader_paused_between_read_and_store_does_not_store_stale(world, read):
    seed(world)

    def do_read(s):
        if read == "get":
            return s.get(User, 1).name
        return s.scalars(select(User).where(User.id == 1)).one().name

    # Warm the dependency versions so the paused read would be allowed to store without the check.
    with world.Session() as s:
        s.get(User, 1).name = "u1"
        s.commit()
    reached, resume = threading.Event(), threading.Event()
    _pause_after_first_select(world.engine, reached, resume, lambda e: e.wait(10))
    seen = {}

    def reader():
        with world.Session() as s:
            seen["value"] = do_read(s)

    t = threading.Thread(target=reader)
    t.start()
    assert reached.wait(10)
    with world.Session() as writer:  # commits while the reader holds the old row
        writer.get(User, 1, execution_options={"cache": False}).name = "new"
        writer.commit()
    refused = world.cache.stats()["stores_refused"]
    resume.set()
    t.join(10)
    assert seen["value"] == "u1"  # it read before the commit: that's fine
    assert world.cache.stats()["stores_refused"] == refused + 1
    for _ in range(2):
        with world.Session() as s:
            assert do_read(s) == "new"


def test_repeatable_read_uses_the_transaction_start(pg_sync_url, pg_schema, redis_url, key_prefix):
    """Under REPEATABLE READ a read late in the transaction sees its start: the generation must too."""
    import redis

    from sqlacache import Cache
    from tests.conftest import _pg_schema_url, _truncate_sync

    url, args = _pg_schema_url(pg_sync_url, pg_schema)
    engine = create_engine(url, connect_args=args, isolation_level="REPEATABLE READ")
    _truncate_sync(engine)
    cache = Cache(backend=redis.Redis.from_url(redis_url), prefix=key_prefix)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    try:
        with Session() as s:
            s.add(User(id=1, name="old"))
            s.commit()
        with Session() as s:  # let dependency versions exist
            s.scalars(select(User).where(User.name != "")).all()
        with Session() as reader:
            reader.connection().exec_driver_sql("SELECT 1 FROM users")  # snapshot taken here
            with Session() as writer:
                writer.get(User, 1, execution_options={"cache": False}).name = "new"
                writer.commit()
            # The snapshot still shows "old"; storing it now would be stale for everyone else.
            assert reader.scalars(select(User).where(User.name != "")).one().name == "old"
        with Session() as s:
            assert s.scalars(select(User).where(User.name != "")).one().name == "new"
        with Session() as s:
            assert s.scalars(select(User).where(User.name != "")).one().name == "new"
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


async def test_async_reader_paused_between_read_and_store(aworld):
    await aseed(aworld)
    async with aworld.Session() as s:
        (await s.get(User, 2)).name = "u2"
        await s.commit()
    refused = aworld.cache.stats()["stores_refused"]
    reached, resume = asyncio.Event(), asyncio.Event()
    _pause_after_first_select(aworld.engine.sync_engine, reached, resume, lambda e: await_only(e.wait()))

    async def reader():
        async with aworld.Session() as s:
            return (await s.get(User, 2)).name

    task = asyncio.create_task(reader())
    await asyncio.wait_for(reached.wait(), 10)
    async with aworld.Session() as writer:
        (await writer.get(User, 2, execution_options={"cache": False})).name = "new"
        await writer.commit()
    resume.set()
    assert await task == "u2"
    await aworld.cache.await_for_stores()  # the store is a task of the event loop, after the read
    assert aworld.cache.stats()["stores_refused"] == refused + 1
    for _ in range(2):
        async with aworld.Session() as s:
            assert (await s.get(User, 2)).name == "new"


def test_threads_never_see_a_value_older_than_a_finished_commit(world):
    """Readers and a writer race for real; after each commit returns, no read may show older data."""
    seed(world, n=2)
    committed = {"v": 0}
    lock = threading.Lock()
    errors = []
    stop = threading.Event()

    def writer():
        for i in range(1, 30):
            with world.Session() as s:
                s.get(User, 1, execution_options={"cache": False}).balance = i
                s.commit()
            with lock:
                committed["v"] = i
        stop.set()

    def reader():
        rnd = random.Random()
        while not stop.is_set():
            with lock:
                floor = committed["v"]
            with world.Session() as s:
                if rnd.random() < 0.5:
                    value = s.get(User, 1).balance
                else:
                    value = s.scalars(select(User).where(User.id == 1)).one().balance
            if value < floor:
                errors.append((floor, value))

    threads = [threading.Thread(target=reader) for _ in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    with world.Session() as s:
        assert s.get(User, 1).balance == 29


@pytest.mark.parametrize("world", ["sqlite+fakeredis", "postgres+redis"], indirect=True)
def test_background_stores_are_checked_like_inline_ones(world):
    """background_stores=True returns from a miss before the store; the store is still refused if a
    commit invalidated what the read saw. (The memory backend always stores inline.)"""
    from sqlacache import Cache

    seed(world)
    cache = Cache(backend=world.cache.backend, prefix=world.cache.prefix, background_stores=True)
    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.get(User, 1).name = "u1"
        s.commit()
    for _ in range(2):  # a cold dependency's first store is refused (its version is created then)
        with Session() as s:
            assert s.get(User, 1).name == "u1"
        cache.wait_for_stores()
    before = world.statements()
    with Session() as s:
        assert s.get(User, 1).name == "u1"
    assert world.statements() == before
    # A reader that read before a commit: its late store must be refused.
    cache.invalidate(User, pks=[1])
    reached, resume = threading.Event(), threading.Event()
    _pause_after_first_select(world.engine, reached, resume, lambda e: e.wait(10))

    def reader():
        with Session() as s:
            s.get(User, 1)

    t = threading.Thread(target=reader)
    t.start()
    assert reached.wait(10)
    with Session() as writer:
        writer.get(User, 1, execution_options={"cache": False}).name = "new"
        writer.commit()
    refused = cache.stats()["stores_refused"]
    resume.set()
    t.join(10)
    cache.wait_for_stores()
    assert cache.stats()["stores_refused"] == refused + 1
    with Session() as s:
        assert s.get(User, 1).name == "new"
    cache.close()


@pytest.mark.parametrize("aworld", ["asyncpg+redis"], indirect=True)
async def test_async_background_stores(aworld):
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from sqlacache import Cache, CachingAsyncSession

    await aseed(aworld)
    cache = Cache(backend=aworld.cache.backend, prefix=aworld.cache.prefix, background_stores=True)
    Session = async_sessionmaker(aworld.engine, class_=CachingAsyncSession, cache=cache)
    for _ in range(2):
        async with Session() as s:
            assert (await s.get(User, 3)).name == "u3"
        await cache.await_for_stores()
    before = aworld.statements()
    async with Session() as s:
        assert (await s.get(User, 3)).name == "u3"
    assert aworld.statements() == before
    assert cache.stats()["stores"] >= 1
    await cache.await_for_stores(timeout=0.5)  # the sync twin's timeout, same name
    with pytest.warns(DeprecationWarning, match=r"await cache\.await_for_stores\(\)"):
        await cache.await_stores()  # the 0.x spelling still works, and says what to write instead


async def test_async_repeatable_read_uses_the_transaction_start(
    pg_async_url, pg_schema, redis_url, key_prefix
):
    import redis.asyncio
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from sqlacache import Cache, CachingAsyncSession
    from tests.conftest import _pg_schema_url

    url, args = _pg_schema_url(pg_async_url, pg_schema)
    engine = create_async_engine(url, connect_args=args, isolation_level="REPEATABLE READ")
    cache = Cache(backend=redis.asyncio.Redis.from_url(redis_url), prefix=key_prefix)
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False)
    stmt = select(User).where(User.name != "")
    try:
        async with Session() as s:
            for t in ("user_tags", "orders", "users", "tags"):
                await s.execute(text(f"DELETE FROM {t}"))
            s.add(User(id=1, name="old"))
            await s.commit()
        async with Session() as s:
            (await s.scalars(stmt)).all()
        async with Session() as reader:
            await reader.execute(text("SELECT 1 FROM users"))  # the snapshot is taken here
            async with Session() as writer:
                (await writer.get(User, 1, execution_options={"cache": False})).name = "new"
                await writer.commit()
            assert (await reader.scalars(stmt)).one().name == "old"
        for _ in range(2):
            async with Session() as s:
                assert (await s.scalars(stmt)).one().name == "new"
    finally:
        await cache.ainvalidate_all()
        await cache.aclose()
        await engine.dispose()
