"""pytest support for applications that use sqlacache (registered through the ``pytest11`` entry point).

Fixtures:

* ``sqlacache_cache``: a cache of its own for one test, installed as the default one (what
  ``sqlacache.configure()`` sets) for the test's duration. In-memory unless
  ``--sqlacache-backend=redis://…``; on Redis a private key prefix, deleted afterwards. It also
  isolates the application's own caches (``sqlacache_isolated``).
* ``sqlacache_isolated``: every live :class:`~sqlacache.Cache` — the ones the application made,
  passed with ``cache=`` — is emptied before and after the test (``invalidate_all``: its own
  prefix only). ``--sqlacache-isolate`` (or the ini option ``sqlacache_isolate = true``) does it
  for every test.
* ``sqlacache_assert``: context managers that fail the block when the cache or the database did
  not do what the test says (``hits(n)``, ``misses(n)``, ``cached()``, ``no_sql(engine)``,
  ``queries(engine, n)``); see :mod:`sqlacache.testing.assertions`.

Options: ``--sqlacache=off`` turns caching off in every Cache for the run (the suite runs against
the database alone); under pytest-xdist every Cache made in a worker gets the worker's id appended
to its prefix (``-gw0``…), so workers sharing one Redis never read or evict each other's entries.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sqlacache import cache as cache_mod
from sqlacache.cache import Cache, install_default
from sqlacache.policy import ConfigurationError
from sqlacache.testing.assertions import CacheAssertions


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlacache")
    group.addoption(
        "--sqlacache-backend",
        default="memory://",
        help="backend URL for the sqlacache_cache fixture (default: memory://)",
    )
    group.addoption(
        "--sqlacache",
        default="on",
        choices=("on", "off"),
        help="off: every sqlacache Cache is disabled for the run (reads go to the database)",
    )
    group.addoption(
        "--sqlacache-isolate",
        action="store_true",
        default=None,
        help="empty every live sqlacache Cache before and after each test",
    )
    parser.addini("sqlacache_isolate", "empty every live sqlacache Cache around each test", type="bool")


# What ``Cache(backend=…)`` takes as a URL (connect.py); anything else is a typo, said before any test.
_SCHEMES = frozenset(
    {
        "memory",
        "mem",
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
        "rediss+sentinel",
        "redis+cluster",
        "rediss+cluster",
    }
)


_SAVED = pytest.StashKey[tuple[dict[str, Any], list[Cache]]]()


def _worker() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config: pytest.Config) -> None:
    backend = config.getoption("--sqlacache-backend")
    scheme = backend.partition("://")[0].lower() if isinstance(backend, str) and "://" in backend else ""
    if scheme not in _SCHEMES:
        raise pytest.UsageError(
            f"--sqlacache-backend={backend!r}: give memory:// or a Redis URL, e.g. redis://localhost:6379/0"
        )
    # Put back at unconfigure: a run inside a run (pytester in-process) leaves the outer one as it was.
    config.stash[_SAVED] = (dict(cache_mod.test_run), [c for c in list(cache_mod.live) if c.enabled])
    worker = _worker()
    if worker:
        # Like pytest-django's test_db_gw0: each worker its own namespace on a shared Redis.
        cache_mod.test_run["prefix_suffix"] = f"-{worker}"
    if config.getoption("--sqlacache") == "off":
        cache_mod.test_run["disabled"] = True
        for cache in list(cache_mod.live):  # made before the plugin ran (a conftest import)
            cache.enabled = False


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_SAVED, None)
    if saved is None:
        return
    run, enabled = saved
    cache_mod.test_run.clear()
    cache_mod.test_run.update(run)
    for cache in enabled:
        cache.enabled = True


def pytest_report_header(config: pytest.Config) -> str:
    state = config.getoption("--sqlacache")
    where = config.getoption("--sqlacache-backend")
    worker = f", prefixes suffixed -{_worker()}" if _worker() else ""
    return f"sqlacache: caching {state}, fixture backend {where}{worker}"


def _empty_all(skip: Cache | None = None) -> None:
    for cache in list(cache_mod.live):
        if cache is not skip and not cache.closed:
            cache.invalidate_all()


@pytest.fixture
def sqlacache_isolated() -> Iterator[None]:
    """Every live Cache starts the test empty and is emptied after it (its own prefix only)."""
    _empty_all()
    try:
        yield
    finally:
        _empty_all()


@pytest.fixture(autouse=True)
def _sqlacache_autoisolate(request: pytest.FixtureRequest) -> None:
    flag = request.config.getoption("--sqlacache-isolate")
    if flag is None:
        flag = request.config.getini("sqlacache_isolate")
    if flag:
        request.getfixturevalue("sqlacache_isolated")


@pytest.fixture
def sqlacache_cache(request: pytest.FixtureRequest, sqlacache_isolated: None) -> Iterator[Cache]:
    """An isolated cache for one test, also installed as the default cache."""
    backend = request.config.getoption("--sqlacache-backend")
    try:  # under pytest-xdist the worker's suffix is appended as to every Cache
        cache = Cache(backend=backend, prefix=f"sqlacache-test-{uuid.uuid4().hex[:12]}")
    except ConfigurationError as exc:
        raise pytest.UsageError(f"--sqlacache-backend={backend!r}: {exc}") from None
    previous = install_default(cache)
    try:
        yield cache
    finally:
        install_default(previous)
        try:
            cache.invalidate_all()
        finally:
            cache.close()


@pytest.fixture
def sqlacache_assert() -> CacheAssertions:
    """Assertions as context managers: ``with sqlacache_assert.hits(2): …``, ``.cached()``,
    ``.misses(n)``, ``.no_sql(engine)``, ``.queries(engine, n)``."""
    return CacheAssertions()
