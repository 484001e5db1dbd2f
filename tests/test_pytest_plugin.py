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


# An application that makes its own Cache and passes it with cache= (the fixture's default cache
# is not what it reads through), tested with the plugin's isolation, assertions and switches.
APP = """
import os
from pathlib import Path

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlacache import Cache, CachingSession


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


ENGINE = create_engine("sqlite:///" + str(Path("items.db").resolve()))
Base.metadata.create_all(ENGINE)
with ENGINE.begin() as conn:
    conn.execute(Item.__table__.delete())
    conn.execute(Item.__table__.insert(), [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
APP_CACHE = Cache(backend=os.environ.get("APP_BACKEND", "memory://"), prefix="app-cache")


def names():
    with CachingSession(ENGINE, cache=APP_CACHE) as s:
        return [i.name for i in s.scalars(select(Item).order_by(Item.id))]
"""

APP_TESTS = """
import pytest
from pathlib import Path
from sqlacache.testing import assert_cached, assert_hits, assert_no_sql
from app import APP_CACHE, ENGINE, names


@pytest.mark.parametrize("run", range(3))
def test_starts_cold(sqlacache_assert, run):
    with Path("prefixes.txt").open("a") as f:
        f.write(APP_CACHE.prefix + "\\n")
    with sqlacache_assert.queries(ENGINE, 1), sqlacache_assert.misses(1):
        assert names() == ["one", "two"]
    with sqlacache_assert.hits(2), sqlacache_assert.no_sql(ENGINE), sqlacache_assert.cached(APP_CACHE):
        assert names() == ["one", "two"]
        assert names() == ["one", "two"]
"""


def _app(pytester: pytest.Pytester, tests: str = APP_TESTS) -> None:
    pytester.makepyfile(app=APP, test_app=tests)


def _run_app(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)


def test_the_applications_own_cache_is_not_isolated_without_the_option(pytester):
    _app(pytester)
    result = _run_app(pytester)
    # The first test fills APP_CACHE; the next ones find its entries: their first read is no miss.
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        ["*expected 1 cache miss(es), got 0; cache counts in the block: {'hits': 1}*"]
    )


@pytest.mark.parametrize("how", ["option", "ini", "fixture"])
def test_the_applications_own_cache_is_emptied_around_each_test(pytester, how):
    args: list[str] = []
    if how == "option":
        _app(pytester)
        args.append("--sqlacache-isolate")
    elif how == "ini":
        _app(pytester)
        pytester.makeini("[pytest]\nsqlacache_isolate = true\n")
    else:  # sqlacache_cache isolates the other caches too
        _app(
            pytester, APP_TESTS.replace("(sqlacache_assert, run)", "(sqlacache_assert, sqlacache_cache, run)")
        )
    result = _run_app(pytester, *args)
    result.assert_outcomes(passed=3)


def test_assertions_fail_with_what_happened(pytester):
    _app(
        pytester,
        """
from sqlacache.testing import assert_cached, assert_hits, assert_no_sql, assert_num_queries
from app import APP_CACHE, ENGINE, names


def test_hits():
    with assert_hits(3):
        names()


def test_cached():
    APP_CACHE.invalidate_all()
    with assert_cached(APP_CACHE):
        names()


def test_no_sql():
    APP_CACHE.invalidate_all()
    with assert_no_sql(ENGINE):
        names()


def test_queries_counts_statements():
    APP_CACHE.invalidate_all()
    with assert_num_queries(ENGINE, 1) as sent:
        names()
        names()
    assert "FROM items" in sent.sql[0]
""",
    )
    result = _run_app(pytester)
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: expected 3 cache hit(s), got 0; cache counts in the block: "
            "{'misses': 1, 'stores': 1}*",
            "*AssertionError: expected the block to be served from the cache (hits, no misses);*",
            "*AssertionError: expected 0 SQL statement(s), got 1:*",
            "*1. SELECT items.id, items.name*",
        ]
    )


def test_caching_off_for_the_whole_run(pytester):
    _app(
        pytester,
        """
import sqlacache
from app import APP_CACHE, ENGINE, names
from sqlacache.testing import assert_num_queries


def test_every_read_reaches_the_database(sqlacache_cache):
    assert not APP_CACHE.enabled and not sqlacache_cache.enabled
    assert not sqlacache.Cache().enabled  # made during the run
    with assert_num_queries(ENGINE, 3):
        names(), names(), names()
    assert APP_CACHE.stats()["hits"] == 0
""",
    )
    result = _run_app(pytester, "--sqlacache=off")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sqlacache: caching off, fixture backend memory://*"])


def test_a_wrong_backend_is_a_usage_error(pytester):
    _app(pytester)
    result = _run_app(pytester, "--sqlacache-backend=memcached://x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--sqlacache-backend='memcached://x': give memory:// or a Redis URL*"])


def test_under_xdist_each_worker_has_its_own_prefix(pytester, redis_url, monkeypatch):
    """Two workers, one Redis, the application's one fixed prefix: each worker's Cache gets the
    worker's suffix, so that each test starts cold and its evictions stay in its worker."""
    pytest.importorskip("xdist")
    import redis

    monkeypatch.setenv("APP_BACKEND", redis_url)
    _app(pytester, APP_TESTS.replace("range(3)", "range(8)"))
    result = _run_app(
        pytester, "-n", "2", "-p", "xdist", "--sqlacache-isolate", f"--sqlacache-backend={redis_url}"
    )
    result.assert_outcomes(passed=8)
    prefixes = set((pytester.path / "prefixes.txt").read_text().split())
    assert prefixes == {"app-cache-gw0", "app-cache-gw1"}
    client = redis.Redis.from_url(redis_url)
    try:
        for prefix in prefixes:  # emptied after each test
            assert [k for k in client.scan_iter(match=f"{prefix}*", count=1000) if b":lock" in k] == []
    finally:
        for prefix in prefixes:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
        client.close()


def test_a_run_inside_a_run_leaves_the_outer_one_as_it_was(pytester):
    from sqlacache import Cache
    from sqlacache import cache as cache_mod

    outer = Cache()
    before = dict(cache_mod.test_run)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_inner="""
import sqlacache

def test_off():
    assert not sqlacache.Cache().enabled
"""
    )
    result = pytester.runpytest_inprocess(
        "--sqlacache=off", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"
    )
    result.assert_outcomes(passed=1)
    assert outer.enabled and Cache().enabled
    assert cache_mod.test_run == before
