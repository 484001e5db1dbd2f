"""A full Redis that evicts (``maxmemory-policy allkeys-lru``, what ``python -m sqlacache doctor``
recommends for a Redis that only caches): Redis drops entries *and* versions to make room, and the
cache must never serve a read older than a finished commit — a dropped version counts as "changed
just now", a dropped entry is a miss.

Two caches (two processes' worth: each its own client and memory) share a throwaway Redis far too
small for what is read; one commits while both read; every read is compared with the database.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from sqlacache import Cache, CachingSession
from tests.faults import RedisServer
from tests.helpers import wal
from tests.models import Base, Order, User

ROWS = 200
PAD = "x" * 2000  # each cached user carries ~2 KB: the gets and lists of 200 overflow 2 MB


@pytest.fixture
def full_redis() -> Any:
    server = RedisServer("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    server.start()
    yield server
    server.stop()


def _truth(engine: Any, what: str, arg: int) -> Any:
    with Session(engine) as s:
        return _read(s, what, arg)


def _read(s: Session, what: str, arg: int) -> Any:
    if what == "get":
        user = s.get(User, arg)
        return None if user is None else (user.name, user.balance)
    if what == "list":
        return [
            (u.id, u.name) for u in s.scalars(select(User).where(User.id % 7 == arg % 7).order_by(User.id))
        ]
    if what == "orders":
        return [
            (o.id, o.total) for o in s.scalars(select(Order).where(Order.user_id == arg).order_by(Order.id))
        ]
    return s.scalar(select(func.count()).select_from(User).where(User.name.like(f"user {arg % 10}%")))


@pytest.mark.redis
def test_an_evicting_redis_never_serves_a_read_older_than_a_commit(full_redis, tmp_path, key_prefix):
    engine = create_engine(f"sqlite:///{tmp_path / 'evict.db'}")
    wal(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(User(id=i, name=f"user {i} {PAD}") for i in range(1, ROWS + 1))
        s.add_all(Order(id=i, user_id=1 + i % ROWS, total=i) for i in range(1, 2 * ROWS + 1))
        s.commit()
    writer = Cache(backend=full_redis.url, prefix=key_prefix)
    reader = Cache(backend=full_redis.url, prefix=key_prefix)
    makers = [sessionmaker(engine, class_=CachingSession, cache=c) for c in (writer, reader)]
    rng = random.Random(1234)
    mismatches: list[Any] = []
    try:
        for step in range(2500):
            if rng.random() < 0.15:
                i = rng.randint(1, ROWS)
                with makers[0]() as s:
                    user = s.get(User, i)
                    assert user is not None
                    user.name = f"user {i} v{step} {PAD}"
                    if rng.random() < 0.5:
                        s.add(Order(user_id=i, total=step))
                    s.commit()
                continue
            what = rng.choice(["get", "get", "list", "orders", "count"])
            arg = rng.randint(1, ROWS)
            with makers[rng.randint(0, 1)]() as s:
                got = _read(s, what, arg)
            want = _truth(engine, what, arg)
            if got != want:
                mismatches.append((step, what, arg, got, want))
        evicted = redis.Redis.from_url(full_redis.url).info("stats")["evicted_keys"]
        stats = [writer.stats(), reader.stats()]
    finally:
        writer.close()
        reader.close()
        engine.dispose()
    assert not mismatches, mismatches[:5]
    assert evicted > 500, f"Redis evicted only {evicted} keys: the test did not fill it"
    assert all(s["hits"] > 30 for s in stats), stats  # and it still caches
    assert all(s["errors"] == 0 for s in stats), stats
