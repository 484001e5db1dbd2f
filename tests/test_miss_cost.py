"""What a read costs when the cache can't serve it: one Redis round trip before the database, and
the first read of anything stored, so that the second is a hit.

The round trips are counted by Redis itself (``MONITOR``), between markers a second client sends:
what the server received from the application's connections, not what a spy thinks was sent.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from sqlalchemy import ForeignKey, create_engine, event, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from sqlacache import Cache, CachingSession
from tests.helpers import aseed, seed
from tests.models import Order, Tag, User


class RedisTrace:
    """Every command Redis receives, in the order it runs them, with markers sent by our own client."""

    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self.marker = redis.Redis.from_url(url)
        self.me = self.marker.client_id()
        self.commands: list[dict[str, Any]] = []
        self._monitor = redis.Redis.from_url(url).monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        self.mark("ready")
        assert self._wait_for("mark:ready")

    def _listen(self) -> None:
        for command in self._monitor.listen():
            self.commands.append(command)
            if command["command"] == "ECHO mark:stop":
                return

    def _wait_for(self, text: str) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(c["command"] == f"ECHO {text}" for c in list(self.commands)):
                return True
            time.sleep(0.005)
        return False

    def mark(self, name: str) -> None:
        self.marker.echo(f"mark:{name}")

    def between(self, start: str, end: str) -> list[str]:
        """The application's round trips (not a script's own commands) between two markers."""
        assert self._wait_for(f"mark:{end}")
        seen = list(self.commands)
        names = [c["command"] for c in seen]
        i, j = names.index(f"ECHO mark:{start}"), names.index(f"ECHO mark:{end}")
        return [
            c["command"]
            for c in seen[i + 1 : j]
            if c.get("client_type") != "lua" and self.prefix in c["command"]
        ]

    def close(self) -> None:
        self.mark("stop")
        self._thread.join(5)
        self._monitor.__exit__(None, None, None)
        self.marker.close()


@pytest.fixture
def trace(redis_url: str, key_prefix: str) -> Any:
    t = RedisTrace(redis_url, key_prefix)
    yield t
    t.close()


def _mark_queries(trace: RedisTrace, sync_engine: Any) -> None:
    event.listen(sync_engine, "before_cursor_execute", lambda *a: trace.mark("db"))


READS = {
    "get": lambda s: s.get(User, 2).name,
    "select": lambda s: [u.name for u in s.scalars(select(User).where(User.name == "u2"))],
}


@pytest.mark.parametrize("world", ["postgres+redis"], indirect=True)
@pytest.mark.parametrize("read", sorted(READS))
def test_a_miss_makes_one_round_trip_before_the_database(world, trace, read):
    seed(world)
    _mark_queries(trace, world.engine)
    for attempt in ("cold", "warm"):  # a cold Redis (no metadata yet), then a key evicted by a write
        trace.mark(f"start-{attempt}")
        with world.Session() as s:
            READS[read](s)
        trace.mark(f"end-{attempt}")
        before = trace.between(f"start-{attempt}", "db")
        assert len(before) == 1, before  # the lookup, which also takes the fill lease
        assert before[0].startswith("EVALSHA")
        after = trace.between("db", f"end-{attempt}") if attempt == "cold" else None
        assert after is None or len(after) == 1, after  # the store, which gives the lease back
        with world.Session() as s:
            s.get(User, 2, execution_options={"cache": False}).name = "u2"  # a write: evicts
            s.commit()
        trace.commands.clear()


@pytest.mark.parametrize("aworld", ["asyncpg+redis"], indirect=True)
@pytest.mark.parametrize("read", ["get", "select"])
async def test_an_async_miss_makes_one_round_trip_before_the_database(aworld, trace, read):
    await aseed(aworld)
    _mark_queries(trace, aworld.engine.sync_engine)
    trace.mark("start")
    async with aworld.Session() as s:
        if read == "get":
            assert (await s.get(User, 2)).name == "u2"
        else:
            assert [u.name for u in await s.scalars(select(User).where(User.name == "u2"))] == ["u2"]
    trace.mark("end")
    before = trace.between("start", "db")
    assert len(before) == 1, before
    assert len(trace.between("db", "end")) <= 1


def test_every_first_read_is_stored(world):
    """On a cache that has never seen the table (a fresh Redis, the quick start): one miss, then hits."""
    seed(world)
    for read in READS.values():
        before = world.statements()
        with world.Session() as s:
            first = read(s)
        assert world.statements() == before + 1
        world.cache.wait_for_stores()
        with world.Session() as s:
            assert read(s) == first
        assert world.statements() == before + 1, world.sql[before:]


EAGER_READS = {
    "selectinload": lambda s: [
        (u.name, [o.total for o in u.orders])
        for u in s.scalars(select(User).options(selectinload(User.orders)).order_by(User.id))
    ],
    "joinedload through a secondary table": lambda s: [
        (u.name, [t.label for t in u.tags])
        for u in s.scalars(select(User).options(joinedload(User.tags)).order_by(User.id)).unique()
    ],
    "two levels": lambda s: [
        (o.total, o.user.name, [t.label for t in o.user.tags])
        for o in s.scalars(
            select(Order).options(selectinload(Order.user).selectinload(User.tags)).order_by(Order.id)
        )
    ],
    "get with an eager option": lambda s: [
        o.total for o in s.get(User, 1, options=[selectinload(User.orders)]).orders
    ],
}


@pytest.mark.parametrize("read", EAGER_READS)
def test_every_first_read_with_eager_loads_is_stored(world, read):
    """The eager loads' tables are not in the statement: their first read used to be refused (their
    roots appeared after it began), so the second read missed again."""
    seed(world)
    with world.Session() as s:
        user = s.get(User, 1)
        user.tags.append(Tag(id=991, label="t1"))
        s.commit()
    world.cache.invalidate_all()  # a cache that has never seen these tables (a fresh Redis)
    before = world.statements()
    with world.Session() as s:
        first = EAGER_READS[read](s)
    assert first and world.statements() > before
    after_first = world.statements()
    world.cache.wait_for_stores()
    with world.Session() as s:
        assert EAGER_READS[read](s) == first
    assert world.statements() == after_first, world.sql[after_first:]


async def test_every_first_async_read_is_stored(aworld):
    await aseed(aworld)
    for read in ("get", "select"):
        before = aworld.statements()
        for _ in range(2):
            async with aworld.Session() as s:
                if read == "get":
                    assert (await s.get(User, 3)).name == "u3"
                else:
                    assert [u.name for u in await s.scalars(select(User).where(User.id == 3))] == ["u3"]
            await aworld.cache.await_for_stores()
        assert aworld.statements() == before + 1, aworld.sql[before:]


@pytest.mark.parametrize("world", ["postgres+redis"], indirect=True)
def test_a_strict_near_cache_asks_redis_once_per_transaction(world, trace, redis_url, key_prefix):
    """near_coherence="strict": reads served from memory cost one small round trip per transaction
    (the fan-out position), whatever their number; a new transaction asks again."""
    seed(world)
    cache = Cache(backend=redis_url, prefix=key_prefix, near_cache=True)
    maker = sessionmaker(world.engine, class_=CachingSession, cache=cache)

    def reads(s: Any) -> list[Any]:
        return [READS["get"](s), READS["select"](s), s.get(User, 1).name]

    try:
        for _ in range(2):  # stored, then read from Redis and taken into memory
            with maker() as s:
                expected = reads(s)
            cache.wait_for_stores()
        before = cache.stats()["near_hits"]
        trace.mark("start")
        with maker() as s:
            assert reads(s) == expected
            trace.mark("commit")
            s.commit()
            assert reads(s) == expected
        trace.mark("end")
        assert cache.stats()["near_hits"] - before == 6
        for start, end in (("start", "commit"), ("commit", "end")):
            sent = trace.between(start, end)
            assert len(sent) == 1 and sent[0].startswith("HMGET"), sent
    finally:
        cache.invalidate_all()
        cache.close()


class _EagerBase(DeclarativeBase):
    pass


class EagerParent(_EagerBase):
    __tablename__ = "eager_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    kids: Mapped[list[EagerKid]] = relationship(lazy="selectin", order_by="EagerKid.id")


class EagerKid(_EagerBase):
    __tablename__ = "eager_kid"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("eager_parent.id"))


def test_a_first_get_with_a_mapper_level_eager_relationship_is_stored(tmp_path):
    """``lazy="selectin"`` on the mapping: ``session.get`` (its fast path, no statement) loads the
    children with it, and its first read is stored all the same."""
    engine = create_engine(f"sqlite:///{tmp_path / 'eager.db'}")
    _EagerBase.metadata.create_all(engine)
    with engine.begin() as conn:  # written outside any cache: the cache has never seen these tables
        conn.execute(EagerParent.__table__.insert(), [{"id": 1}])
        conn.execute(EagerKid.__table__.insert(), [{"id": 1, "parent_id": 1}, {"id": 2, "parent_id": 1}])
    sql: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: sql.append(stmt))
    cache = Cache("memory://")
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    try:
        for _ in range(2):
            with Session() as s:
                parent = s.get(EagerParent, 1)
                assert parent is not None and [k.id for k in parent.kids] == [1, 2]
        assert len(sql) == 2, sql  # the first get and its selectin load; the second get hit
    finally:
        cache.close()
        engine.dispose()
