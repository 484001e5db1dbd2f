"""The ``sqlacache_cache`` fixture (sqlacache.pytest_plugin, registered through ``pytest11``)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INNER = '''
import sqlacache
import pytest
from pathlib import Path
from sqlalchemy import String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlacache import CachingSession


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


# One database file for every test, so a cache shared between tests would serve its entries.
ENGINE = create_engine("sqlite:///" + str(Path("items.db").resolve()))
Base.metadata.create_all(ENGINE)
with ENGINE.begin() as conn:
    conn.execute(Item.__table__.insert(), [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
SQL = []
event.listen(ENGINE, "before_cursor_execute", lambda conn, cur, stmt, *rest: SQL.append(stmt))
Session = sessionmaker(ENGINE, class_=CachingSession)  # no cache=: the default one is used

CONFIGURED = sqlacache.configure(backend="memory://")  # what the application set up
SEEN = []


@pytest.fixture(autouse=True)
def default_restored():
    yield  # torn down after sqlacache_cache: the application's default must be back
    assert sqlacache.default_cache() is CONFIGURED


def read():
    """Run the query in a fresh session; return (names, SQL statements it sent)."""
    before = len(SQL)
    with Session() as s:
        names = [i.name for i in s.scalars(select(Item).order_by(Item.id))]
    return names, len(SQL) - before


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_starts_with_an_empty_cache(sqlacache_cache, run):
    assert sqlacache.default_cache() is sqlacache_cache is not CONFIGURED
    assert all(sqlacache_cache is not other for other in SEEN)
    SEEN.append(sqlacache_cache)
    with Path("prefixes.txt").open("a") as f:
        f.write(sqlacache_cache.prefix + "\\n")
    with Session() as s:
        assert s.cache is sqlacache_cache
    # Whatever the previous test cached, this one starts cold: its first read goes to the database
    # (and is stored), the next ones are served from the cache.
    assert [read() for _ in range(3)] == [(["one", "two"], 1), (["one", "two"], 0), (["one", "two"], 0)]
    stats = sqlacache_cache.stats()
    assert (stats["hits"], stats["misses"], stats["stores"]) == (2, 1, 1)


def test_without_the_fixture_the_application_default_is_used():
    assert sqlacache.default_cache() is CONFIGURED
    with Session() as s:
        assert s.cache is CONFIGURED
'''


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=INNER)
    # A subprocess: the inner tests change module globals (the default cache) of their process,
    # and the plugin must be found through the installed package's entry point, not with -p.
    # (hypothesis' plugin is not needed and doubles the start-up time.)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)


def test_fixture_isolates_tests_and_restores_the_default_cache(pytester):
    result = _run(pytester)
    result.assert_outcomes(passed=3)


def test_fixture_on_redis_uses_a_private_prefix_and_deletes_it(pytester, redis_url):
    import redis

    result = _run(pytester, f"--sqlacache-backend={redis_url}")
    result.assert_outcomes(passed=3)
    prefixes = (pytester.path / "prefixes.txt").read_text().split()
    assert len(prefixes) == 2 and prefixes[0] != prefixes[1]
    client = redis.Redis.from_url(redis_url)
    try:
        for prefix in prefixes:
            assert list(client.scan_iter(match=f"{prefix}*", count=1000)) == []
    finally:
        client.close()
