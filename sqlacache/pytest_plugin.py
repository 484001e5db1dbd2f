"""pytest fixtures for applications that use sqlacache (registered through the ``pytest11`` entry point).

``sqlacache_cache`` gives each test its own :class:`~sqlacache.Cache`, installed as the default one
(what ``sqlacache.configure()`` sets) for the test's duration, so nothing cached in one test is seen
by another. It uses the in-memory backend unless ``--sqlacache-backend=redis://…`` is given; on
Redis each test gets its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from sqlacache.cache import Cache, install_default


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sqlacache-backend",
        default="memory://",
        help="backend URL for the sqlacache_cache fixture (default: memory://)",
    )


@pytest.fixture
def sqlacache_cache(request: pytest.FixtureRequest) -> Iterator[Cache]:
    """An isolated cache for one test, also installed as the default cache."""
    backend = request.config.getoption("--sqlacache-backend")
    cache = Cache(backend=backend, prefix=f"sqlacache-test-{uuid.uuid4().hex[:12]}")
    previous = install_default(cache)
    try:
        yield cache
    finally:
        install_default(previous)
        try:
            cache.invalidate_all()
        finally:
            cache.close()
