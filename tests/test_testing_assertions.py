"""``sqlacache.testing``'s assertions, in process: what they count and what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlacache import Cache, CachingAsyncSession, CachingSession
from sqlacache.testing import (
    assert_cached,
    assert_hits,
    assert_misses,
    assert_no_sql,
    assert_num_queries,
    counting,
)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "assert_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(20))


@pytest.fixture
def db(tmp_path: Path) -> str:
    engine = create_engine(f"sqlite:///{tmp_path / 'notes.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Note(id=1, text="hi"))
        s.commit()
    engine.dispose()
    return str(tmp_path / "notes.db")


def test_counts_every_live_cache_and_the_ones_made_in_the_block(db: str) -> None:
    engine = create_engine(f"sqlite:///{db}")
    first = Cache()
    made = []
    with counting() as counted:
        made += [Cache(), Cache()]  # made inside the block (and alive at its end)
        for cache in (first, *made):
            for _ in range(2):
                with CachingSession(engine, cache=cache) as s:
                    s.get(Note, 1)
    assert (counted.hits, counted.misses, counted.stores) == (3, 3, 3)
    with assert_hits(1, cache=first), assert_misses(0), CachingSession(engine, cache=first) as s:
        s.get(Note, 1)


def test_assertions_fail_and_pass(db: str) -> None:
    engine = create_engine(f"sqlite:///{db}")
    cache = Cache()
    hit_once = pytest.raises(AssertionError, match=r"expected 1 cache hit\(s\), got 0")
    with hit_once, assert_hits(1, cache), CachingSession(engine, cache=cache) as s:
        s.get(Note, 1)
    with assert_cached(cache), assert_no_sql(engine), CachingSession(engine, cache=cache) as s:
        s.get(Note, 1)
    # Nothing read at all is not "served from the cache".
    with (
        pytest.raises(AssertionError, match=r"expected the block to be served from the cache"),
        assert_cached(cache),
    ):
        pass
    two = pytest.raises(AssertionError, match=r"expected 2 SQL statement\(s\), got 1:\n  1\. SELECT")
    with two, assert_num_queries(engine, 2), Session(engine) as s:
        s.get(Note, 1)
    with pytest.raises(TypeError, match="is not an Engine"), assert_no_sql("sqlite://"):
        pass


def test_a_failure_inside_the_block_is_not_hidden(db: str) -> None:
    engine = create_engine(f"sqlite:///{db}")
    with pytest.raises(ZeroDivisionError), assert_num_queries(engine, 5):
        1 / 0  # noqa: B018


async def test_async_engine_and_session(db: str) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    cache = Cache()
    with assert_num_queries(engine, 1), assert_misses(1, cache):
        async with CachingAsyncSession(engine, cache=cache) as s:
            assert [n.text for n in (await s.scalars(select(Note))).all()] == ["hi"]
    with assert_no_sql(engine), assert_hits(1, cache):
        async with CachingAsyncSession(engine, cache=cache) as s:
            assert [n.text for n in (await s.scalars(select(Note))).all()] == ["hi"]
    await engine.dispose()
