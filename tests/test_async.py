"""CachingAsyncSession: the same guarantees through asyncio drivers and asyncio Redis."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from sqlacache import Cache
from tests.helpers import acached, aseed
from tests.models import Order, User

# Freshness: also in the near-cache and cluster worlds (conftest.py).
pytestmark = [pytest.mark.near_worlds, pytest.mark.cluster_worlds]


async def test_get_and_list_hits_emit_no_sql(aworld):
    await aseed(aworld)

    async def get(s):
        return (await s.get(User, 1)).name

    async def listing(s):
        users = (await s.execute(select(User).where(User.active).order_by(User.id))).scalars().all()
        return [x.name for x in users]

    async def count(s):
        return await s.scalar(select(func.count()).select_from(User))

    assert await acached(aworld, get) == ("u1", "u1")
    assert await acached(aworld, listing) == (["u1", "u2", "u3"],) * 2
    assert await acached(aworld, count) == (3, 3)


async def test_eager_loads_never_raise_missing_greenlet(aworld):
    await aseed(aworld)

    async def read(s):
        users = (await s.scalars(select(User).options(selectinload(User.orders)).order_by(User.id))).all()
        return [[o.total for o in u.orders] for u in users]  # attribute access outside the greenlet

    db, hit = await acached(aworld, read)
    assert hit == db == [[0, 1]] * 3


async def test_cached_is_lazy_and_reads_through(aworld):
    await aseed(aworld)
    cache = Cache(backend=aworld.cache.backend, prefix=aworld.cache.prefix, models={User: {"ops": {"get"}}})
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from sqlacache import CachingAsyncSession

    Session = async_sessionmaker(aworld.engine, class_=CachingAsyncSession, cache=cache)
    stmt = select(Order).where(Order.total == 1).order_by(Order.id)
    async with Session() as s:
        before = aworld.statements()
        pending = s.execute(stmt).cached(ttl=30)
        assert aworld.statements() == before  # nothing runs until awaited
        (await pending).scalars().all()
    async with Session() as s:
        (await s.execute(stmt).cached(ttl=30)).scalars().all()
    before = aworld.statements()
    async with Session() as s:
        assert [o.id for o in (await s.execute(stmt).cached(ttl=30)).scalars()] == [11, 21, 31]
        assert aworld.statements() == before


async def test_commit_evicts(aworld):
    await aseed(aworld)
    await acached(aworld, lambda s: s.get(User, 2))
    async with aworld.Session() as s:
        (await s.get(User, 2)).name = "changed"
        await s.commit()
    async with aworld.Session() as s:
        assert (await s.get(User, 2)).name == "changed"


async def test_bind_caches_plain_async_sessions(aworld):
    await aseed(aworld)
    cache = Cache(backend=aworld.cache.backend, prefix=aworld.cache.prefix + "-bound")
    await cache.bind(aworld.engine)
    try:
        for _ in range(2):
            async with AsyncSession(aworld.engine) as s:
                await s.scalars(select(User).order_by(User.id))
        before = aworld.statements()
        async with AsyncSession(aworld.engine) as s:
            assert [u.name for u in await s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
        assert aworld.statements() == before
        async with AsyncSession(aworld.engine) as s:
            (await s.get(User, 1)).name = "bound"
            await s.commit()
        async with AsyncSession(aworld.engine) as s:
            assert (await s.scalars(select(User).order_by(User.id))).first().name == "bound"
    finally:
        cache.unbind(aworld.engine)
        await cache.ainvalidate_all()
