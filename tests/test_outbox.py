"""The transactional outbox: an invalidation survives the death of the process that committed it."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession, ConfigurationError
from sqlacache.resilience.outbox import table as outbox_table
from tests.conftest import _pg_schema_url, _truncate_sync
from tests.helpers import until
from tests.models import Base, User


def _database(db, request, tmp_path):
    if db == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}", {}
    return _pg_schema_url(request.getfixturevalue("pg_sync_url"), request.getfixturevalue("pg_schema"))


def _rows(engine):
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_table)).scalar_one()


def _commit_and_die(db_url, connect_args, prefix):
    """A process cut off from Redis commits a rename, then dies before it could deliver it."""
    engine = create_engine(db_url, connect_args=connect_args)
    cache = Cache(backend="redis://127.0.0.1:1/0", prefix=prefix)  # nothing listens there
    cache.use_outbox(engine)
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        s.get(User, 1, execution_options={"cache": False}).name = "renamed"
        s.commit()
    assert cache.stats()["pending_invalidations"] > 0
    import os

    os._exit(0)  # no retry, no relay, no goodbye


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    url, args = _database(request.param, request, tmp_path)
    engine = create_engine(url, connect_args=args)
    engine.test_database = (url, args)  # for the subprocess
    Base.metadata.create_all(engine)
    _truncate_sync(engine)
    outbox_table.drop(engine, checkfirst=True)
    with sessionmaker(engine)() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in (1, 2)])
        s.commit()
    yield engine
    outbox_table.drop(engine, checkfirst=True)
    engine.dispose()


def test_an_invalidation_outlives_the_process_that_committed_it(db, fresh_redis, key_prefix):
    reader = Cache(backend=fresh_redis.url, prefix=key_prefix)
    Session = sessionmaker(db, class_=CachingSession, cache=reader)
    for _ in range(3):
        with Session() as s:
            assert s.get(User, 1).name == "u1"
    outbox_table.create(db, checkfirst=True)
    url, args = db.test_database
    proc = multiprocessing.get_context("spawn").Process(target=_commit_and_die, args=(url, args, key_prefix))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert _rows(db) == 1  # written in the committing transaction, never delivered
    with Session() as s:
        assert s.get(User, 1).name == "u1"  # the failure the outbox is for: a lost invalidation
    reader.use_outbox(db, grace=0.1, interval=0.05)  # any process's relay delivers it
    assert until(lambda: _rows(db) == 0)
    with Session() as s:
        assert s.get(User, 1).name == "renamed"
    assert reader.stats()["outbox_relayed"] == 1
    reader.invalidate_all()
    reader.close()


def test_delivered_rows_are_deleted_and_undelivered_ones_kept_until_redis_is_back(db, proxy, key_prefix):
    cache = Cache(backend=proxy.url, prefix=key_prefix)
    cache.use_outbox(db, grace=0.2, interval=0.05)
    Session = sessionmaker(db, class_=CachingSession, cache=cache)
    with Session() as s:
        s.get(User, 1).name = "one"
        s.commit()
    assert until(lambda: _rows(db) == 0)  # delivered at commit, its row deleted in a batch
    with Session() as s:
        s.get(User, 2).name = "rolled back"
        s.rollback()
    assert _rows(db) == 0
    proxy.refuse(True)
    proxy.drop()
    try:
        with Session() as s:
            s.get(User, 1, execution_options={"cache": False}).name = "two"
            s.commit()
        time.sleep(0.5)
        assert _rows(db) == 1  # past the grace, but Redis is unreachable: kept
    finally:
        proxy.heal()
    assert until(lambda: _rows(db) == 0)
    with Session() as s:
        assert s.get(User, 1).name == "two"
    cache.invalidate_all()
    cache.close()


async def test_async_sessions_write_the_outbox_too(tmp_path, fresh_redis, key_prefix):
    sync_engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    Base.metadata.create_all(sync_engine)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    cache = Cache(backend=fresh_redis.url, prefix=key_prefix)
    cache.use_outbox(sync_engine, grace=60, interval=0.05)
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False)
    async with Session() as s:
        s.add(User(id=1, name="u1"))
        await s.commit()
    async with Session() as s:
        assert (await s.get(User, 1)).name == "u1"
    written = []
    from sqlalchemy import event

    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: written.append(a[2]))
    async with Session() as s:
        (await s.get(User, 1)).name = "renamed"
        await s.commit()
    assert any("sqlacache_outbox" in q for q in written)
    assert until(lambda: _rows(sync_engine) == 0)
    await cache.ainvalidate_all()
    await cache.aclose()
    await engine.dispose()
    sync_engine.dispose()


def test_use_outbox_needs_a_sync_engine(tmp_path):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError, match="not a sync Engine"):
        Cache().use_outbox(engine)
