"""Assertions for application tests, in the spirit of Django's ``assertNumQueries``.

Each is a context manager that fails the block (``AssertionError``, with what happened) when the
cache or the database did not do what the test says: served from the cache, hit ``n`` times,
sent no SQL. Counting is over every live :class:`~sqlacache.Cache` unless one is named, so they
work whether the application passes ``cache=`` itself or uses the default cache.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sqlacache.cache import Cache, live

# A hit served from the near-cache is counted apart from one served by the backend.
_HITS = ("hits", "near_hits")


@dataclass
class Counted:
    """What a block did, filled in when it ends: hits, misses and stores summed over the caches."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def _counts(caches: list[Cache]) -> dict[int, dict[str, Any]]:
    return {id(c): c.count.snapshot() for c in caches}


@contextlib.contextmanager
def counting(cache: Cache | None = None) -> Iterator[Counted]:
    """Count what the cache did inside the block; with None, every cache alive at the block's end
    (made before it or inside it: one collected inside the block takes its counts with it)."""
    before = _counts([cache] if cache is not None else list(live))
    out = Counted()
    try:
        yield out
    finally:
        caches = [cache] if cache is not None else list(live)
        for c in caches:
            c.io.settle_stores()  # stores sent without waiting for their replies: count them
        after = _counts(caches)
        for key, now in after.items():
            then = before.get(key, {})
            for name, value in now.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    delta = value - int(then.get(name, 0))
                    if delta:
                        out.counts[name] = out.counts.get(name, 0) + delta
        out.hits = sum(out.counts.get(name, 0) for name in _HITS)
        out.misses = out.counts.get("misses", 0)
        out.stores = out.counts.get("stores", 0)


def _describe(counted: Counted) -> str:
    shown = {
        k: v for k, v in sorted(counted.counts.items()) if k in ("hits", "near_hits", "misses", "stores")
    }
    return f"cache counts in the block: {shown or 'nothing'}"


@contextlib.contextmanager
def assert_hits(n: int, cache: Cache | None = None) -> Iterator[Counted]:
    """The block was served from the cache exactly ``n`` times (reads and memoized calls)."""
    with counting(cache) as counted:
        yield counted
    if counted.hits != n:
        raise AssertionError(f"expected {n} cache hit(s), got {counted.hits}; {_describe(counted)}")


@contextlib.contextmanager
def assert_misses(n: int, cache: Cache | None = None) -> Iterator[Counted]:
    """The cache missed exactly ``n`` times in the block (each miss read the database)."""
    with counting(cache) as counted:
        yield counted
    if counted.misses != n:
        raise AssertionError(f"expected {n} cache miss(es), got {counted.misses}; {_describe(counted)}")


@contextlib.contextmanager
def assert_cached(cache: Cache | None = None) -> Iterator[Counted]:
    """Every cached read in the block was a hit: at least one, and no miss."""
    with counting(cache) as counted:
        yield counted
    if counted.hits == 0 or counted.misses:
        raise AssertionError(
            f"expected the block to be served from the cache (hits, no misses); {_describe(counted)}"
        )


@dataclass
class Statements:
    """The SQL statements an engine was sent inside the block."""

    sql: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sql)


def _sync_engine(bind: Any) -> Engine:
    if isinstance(bind, (AsyncEngine, AsyncConnection)):
        bind = bind.sync_engine if isinstance(bind, AsyncEngine) else bind.sync_connection
    if isinstance(bind, Connection):
        bind = bind.engine
    if not isinstance(bind, Engine):
        raise TypeError(f"{bind!r} is not an Engine, AsyncEngine or connection")
    return bind


@contextlib.contextmanager
def recording(bind: Any) -> Iterator[Statements]:
    """Record the statements sent to ``bind``'s engine (by any thread) inside the block."""
    engine = _sync_engine(bind)
    out = Statements()
    lock = threading.Lock()

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        with lock:
            out.sql.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield out
    finally:
        event.remove(engine, "before_cursor_execute", record)


@contextlib.contextmanager
def assert_num_queries(bind: Any, n: int) -> Iterator[Statements]:
    """``bind`` (an Engine, AsyncEngine or connection) was sent exactly ``n`` statements."""
    with recording(bind) as statements:
        yield statements
    if len(statements) != n:
        listed = "".join(f"\n  {i + 1}. {s}" for i, s in enumerate(statements.sql))
        raise AssertionError(f"expected {n} SQL statement(s), got {len(statements)}:{listed or ' none'}")


@contextlib.contextmanager
def assert_no_sql(bind: Any) -> Iterator[Statements]:
    """No SQL reached ``bind``'s database inside the block."""
    with assert_num_queries(bind, 0) as statements:
        yield statements


class CacheAssertions:
    """The ``sqlacache_assert`` fixture: the assertions above as methods."""

    def hits(self, n: int, cache: Cache | None = None) -> contextlib.AbstractContextManager[Counted]:
        return assert_hits(n, cache)

    def misses(self, n: int, cache: Cache | None = None) -> contextlib.AbstractContextManager[Counted]:
        return assert_misses(n, cache)

    def cached(self, cache: Cache | None = None) -> contextlib.AbstractContextManager[Counted]:
        return assert_cached(cache)

    def no_sql(self, bind: Any) -> contextlib.AbstractContextManager[Statements]:
        return assert_no_sql(bind)

    def queries(self, bind: Any, n: int) -> contextlib.AbstractContextManager[Statements]:
        return assert_num_queries(bind, n)

    def counting(self, cache: Cache | None = None) -> contextlib.AbstractContextManager[Counted]:
        return counting(cache)
