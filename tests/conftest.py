"""Shared fixtures: real servers when they are there, a loud failure in CI when they are not.

Tests that need Redis or PostgreSQL take the ``redis_url`` / ``pg_sync_url`` / ``pg_async_url``
fixtures. On a laptop without the servers those tests skip with a reason; with ``CI`` set they fail,
so a CI run can never pass by silently skipping the integration suite.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("SQLACACHE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_SYNC_URL = os.environ.get("SQLACACHE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_ASYNC_URL = os.environ.get(
    "SQLACACHE_TEST_PG_ASYNC_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def _require(name: str, url: str, default_port: int) -> str:
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url}"
    if IN_CI:
        pytest.fail(f"{message}; CI must run the integration suite (.ci/run starts the servers)")
    pytest.skip(f"{message}; start it or set the SQLACACHE_TEST_* URL to run these tests")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("SQLACACHE_TEST_REDIS_ACL", "") not in ("", "0"):
        # Every test as a Redis ACL user limited to the keys and channels ~sqlacache-* (every prefix
        # the tests use starts so), on a redis-server of its own: see tests/acl.py.
        from tests.acl import restricted_redis

        with restricted_redis() as url:
            yield url
        return
    yield _require("Redis", REDIS_URL, 6379)


@pytest.fixture(scope="session")
def pg_sync_url() -> str:
    return _require("PostgreSQL", PG_SYNC_URL, 5432)


@pytest.fixture(scope="session")
def pg_async_url() -> str:
    return _require("PostgreSQL", PG_ASYNC_URL, 5432)


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A prefix no other test uses, so tests sharing one Redis never see each other's keys."""
    yield f"sqlacache-test-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# Worlds: a database, a backend and a session factory wired together, sync and async.

import asyncio  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from sqlacache import Cache, CachingAsyncSession, CachingSession  # noqa: E402
from tests.helpers import wal  # noqa: E402
from tests.models import Base  # noqa: E402


@dataclass
class World:
    """Everything a behaviour test needs; ``sql`` records every statement sent to the database."""

    name: str
    engine: Any
    cache: Cache
    Session: Any
    sql: list[str] = field(default_factory=list)
    is_async: bool = False
    cache_kw: dict[str, Any] = field(default_factory=dict)  # what made ``cache`` (near_cache=True…)

    @property
    def dialect(self) -> str:
        return str(self.engine.dialect.name)

    def statements(self) -> int:
        return len(self.sql)

    @property
    def near(self) -> bool:
        return self.cache.near is not None

    def make_cache(self, **kw: Any) -> Cache:
        """Another Cache on the same backend (another process would look like this): in a near
        world, with a near-cache and a fan-out subscriber of its own."""
        return Cache(backend=self.cache.backend, **{"prefix": self.cache.prefix, **self.cache_kw, **kw})


def _record(world: World, sync_engine: Any) -> None:
    @event.listens_for(sync_engine, "before_cursor_execute")
    def _(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        world.sql.append(statement)


def _pg_schema_url(url: str, schema: str) -> tuple[str, dict[str, Any]]:
    if "asyncpg" in url:
        return url, {"server_settings": {"search_path": schema}}
    return url, {"options": f"-csearch_path={schema}"}


@pytest.fixture(scope="session")
def pg_schema(pg_sync_url: str) -> Iterator[str]:
    """A private PostgreSQL schema for this test run, with the test tables; dropped at the end."""
    schema = f"sqlacache_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url, args = _pg_schema_url(pg_sync_url, schema)
    engine = create_engine(url, connect_args=args)
    Base.metadata.create_all(engine)
    engine.dispose()
    yield schema
    with admin.begin() as conn:
        # A test that leaked a connection inside a transaction must fail the run, not hang it.
        conn.execute(text("SET LOCAL lock_timeout = '20s'"))
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _backend(kind: str, request: pytest.FixtureRequest, prefix: str) -> Any:
    if kind == "memory":
        return "memory://"
    if kind == "fakeredis":
        import fakeredis

        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    if kind == "cluster":
        return request.getfixturevalue("redis_cluster").url
    url = request.getfixturevalue("redis_url")
    import redis

    return redis.Redis.from_url(url)


def _truncate_sync(engine: Any) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


SYNC_WORLDS = ["sqlite+memory", "sqlite+fakeredis", "postgres+redis"]
ASYNC_WORLDS = ["aiosqlite+memory", "asyncpg+redis"]

# Near worlds: the real Redis with a near-cache in front of it (``near_cache=True``, strict
# coherence), in every Cache of the world, ``make_cache()``'s too (another process: its own
# near-cache and its own fan-out subscriber). They multiply run time, so they run only in the
# modules that opt in with ``pytestmark = pytest.mark.near_worlds``: the freshness tests (see
# ``pytest_collection_modifyitems`` below). A test that parametrizes ``world``/``aworld`` itself
# picks its worlds explicitly.
NEAR_SYNC_WORLDS = ["sqlite+redis+near", "postgres+redis+near"]
NEAR_ASYNC_WORLDS = ["aiosqlite+redis+near", "asyncpg+redis+near"]
NEAR_WORLDS = frozenset(NEAR_SYNC_WORLDS + NEAR_ASYNC_WORLDS)
NEAR = {"near_cache": True, "near_coherence": "strict"}
# Cluster worlds: PostgreSQL with the Redis Cluster backend on a throwaway 3-master cluster
# (``redis_cluster`` below), only in the modules marked ``cluster_worlds`` (the freshness tests).
# ``postgres+cluster+near``: the same with a near-cache (strict), fanned out by sharded pub/sub.
CLUSTER_SYNC_WORLDS = ["postgres+cluster", "postgres+cluster+near"]
# ``asyncpg+cluster``: an AsyncSession on a ``redis.asyncio.cluster.RedisCluster`` client (every call
# awaited from SQLAlchemy's greenlet, no sync client at all); ``asyncpg+cluster+near``: the cluster's
# URL (its sync client runs the near-cache's subscriber thread) with a near-cache (strict).
CLUSTER_ASYNC_WORLDS = ["asyncpg+cluster", "asyncpg+cluster+near"]
CLUSTER_WORLDS = frozenset(CLUSTER_SYNC_WORLDS + CLUSTER_ASYNC_WORLDS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--worlds",
        choices=("default", "extended", "all"),
        default="default",
        help="default: the plain worlds only (the README's test command, under ten minutes); "
        "extended: only the near-cache and cluster variants of the modules marked near_worlds / "
        "cluster_worlds, and of the stateful oracle (a CI step of its own); all: both",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "near_worlds: also run this module's world/aworld tests in the near-cache worlds (conftest.py)",
    )
    config.addinivalue_line(
        "markers",
        "cluster_worlds: also run this module's world/aworld tests on a Redis Cluster (conftest.py)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Near worlds only in the modules (or tests) marked ``near_worlds``, cluster worlds only in those
    marked ``cluster_worlds``; and of those variants, what ``--worlds`` asks for."""

    def explicit(item: pytest.Item) -> bool:  # the test (or its module) names its worlds itself
        for mark in item.iter_markers("parametrize"):
            names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",")]
            if {"world", "aworld"} & set(names):
                return True
        return False

    def wanted(item: pytest.Item) -> bool:
        params = getattr(getattr(item, "callspec", None), "params", {})
        in_near = any(params.get(name) in NEAR_WORLDS for name in ("world", "aworld"))
        if any(params.get(name) in CLUSTER_WORLDS for name in ("world", "aworld")):
            return item.get_closest_marker("cluster_worlds") is not None or explicit(item)
        return not in_near or item.get_closest_marker("near_worlds") is not None or explicit(item)

    def variant(item: pytest.Item) -> bool:  # a near or cluster variant a marker opted into
        params = getattr(getattr(item, "callspec", None), "params", {})
        # test_oracle.py's own world fixture: its near and cluster worlds run in the extended step too.
        worlds = {params.get("world"), params.get("aworld"), params.get("oracle_env")}
        return bool(worlds & (NEAR_WORLDS | CLUSTER_WORLDS)) and not explicit(item)

    mode = config.getoption("--worlds")
    items[:] = [
        item for item in items if wanted(item) and (mode == "all" or (mode == "extended") == variant(item))
    ]


def _near_kw(param: str) -> dict[str, Any]:
    return dict(NEAR) if param.endswith("+near") else {}


@pytest.fixture(params=SYNC_WORLDS + NEAR_SYNC_WORLDS + CLUSTER_SYNC_WORLDS)
def world(request: pytest.FixtureRequest, tmp_path: Any, key_prefix: str) -> Iterator[World]:
    db, backend_kind = request.param.split("+")[:2]
    if db == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'test.db'}")
        wal(engine)
        Base.metadata.create_all(engine)
    else:
        schema = request.getfixturevalue("pg_schema")
        url, args = _pg_schema_url(request.getfixturevalue("pg_sync_url"), schema)
        engine = create_engine(url, connect_args=args)
        _truncate_sync(engine)
    kw = _near_kw(request.param)
    cache = Cache(backend=_backend(backend_kind, request, key_prefix), prefix=key_prefix, **kw)
    w = World(
        request.param, engine, cache, sessionmaker(engine, class_=CachingSession, cache=cache), cache_kw=kw
    )
    _record(w, engine)
    yield w
    cache.invalidate_all()
    cache.close()
    engine.dispose()


@pytest.fixture(params=ASYNC_WORLDS + NEAR_ASYNC_WORLDS + CLUSTER_ASYNC_WORLDS)
async def aworld(request: pytest.FixtureRequest, tmp_path: Any, key_prefix: str) -> AsyncIterator[World]:
    db, backend_kind = request.param.split("+")[:2]
    kw = _near_kw(request.param)
    if db == "aiosqlite":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
        wal(engine.sync_engine)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        backend: Any = "memory://"
    else:
        schema = request.getfixturevalue("pg_schema")
        url, args = _pg_schema_url(request.getfixturevalue("pg_async_url"), schema)
        engine = create_async_engine(url, connect_args=args)
        async with engine.begin() as conn:
            await conn.run_sync(
                lambda c: [c.execute(t.delete()) for t in reversed(Base.metadata.sorted_tables)]
            )
    if backend_kind == "redis":
        if kw:  # the near-cache's subscriber thread needs the sync client a URL makes too
            backend = request.getfixturevalue("redis_url")
        else:
            import redis.asyncio

            backend = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
    elif backend_kind == "cluster" and kw:
        backend = request.getfixturevalue("redis_cluster").url
    elif backend_kind == "cluster":
        import redis.asyncio.cluster

        node = request.getfixturevalue("redis_cluster")
        backend = redis.asyncio.cluster.RedisCluster("127.0.0.1", node.ports[0], socket_timeout=2)
    cache = Cache(backend=backend, prefix=key_prefix, **kw)
    w = World(
        request.param,
        engine,
        cache,
        async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False),
        is_async=True,
        cache_kw=kw,
    )
    _record(w, engine.sync_engine)
    yield w
    await cache.ainvalidate_all()
    await cache.aclose()
    if backend_kind == "cluster" and not kw:  # a client passed in is the caller's to close
        await backend.aclose()
    await engine.dispose()
    await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------
# A throwaway redis-server per test module, for tests that pause, kill, fill or restart Redis,
# and a TCP proxy in front of it for latency, blackholes and dropped connections.

import shutil  # noqa: E402

from tests.faults import RedisServer, TcpProxy  # noqa: E402


def require_redis_server(what: str) -> None:
    """Skip (fail in CI) unless the redis-server binary is there to start ``what``'s servers."""
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail(f"redis-server is not installed; CI must provide it ({what})")
        pytest.skip(f"redis-server is not installed; install it to run {what}")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this module's own (never the shared one); killed at the end of the module."""
    require_redis_server("the fault-injection tests")
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> RedisServer:
    """The module's redis-server, running, not paused, without a memory limit, empty, no scripts."""
    redis_server.resume()
    if not redis_server.running:
        redis_server.start()
    try:
        redis_server.clear_oom()
    except Exception:
        redis_server.restart()  # whatever a test left it in, a new process is a clean one
        redis_server.clear_oom()
    redis_server.flushall()
    redis_server.script_flush()
    return redis_server


@pytest.fixture
def proxy(fresh_redis: RedisServer) -> Iterator[TcpProxy]:
    """A started TcpProxy in front of ``fresh_redis``; stopped after the test."""
    p = TcpProxy(fresh_redis.port)
    p.start()
    yield p
    p.stop()


# ---------------------------------------------------------------------------------------------
# Every result layout (ResultTemplate) the suite makes a process learn from a database execution is
# checked against the one sqlacache derives from the statement alone, for a hit on a shape the
# process has never run (read/execute.py _derive): they must be the same.

from sqlacache import _sa  # noqa: E402
from sqlacache.read import execute as _execute  # noqa: E402
from sqlacache.read.results import derive_template  # noqa: E402
from tests.helpers import template_signature  # noqa: E402

_derivations = {"checked": 0, "not derivable": 0}


@pytest.fixture(autouse=True)
def _derived_templates_match_learned(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fills: list[tuple[Any, Any, Any, Any]] = []
    derived: set[int] = set()
    fill, derive = _execute._fill, _execute.derive_template

    def recording_fill(state: Any, capture: Any, guard: Any) -> Any:
        mode = _sa.result_mode(state.load_options)
        if mode not in capture.info.templates:
            dialect = state.session.get_bind(**state.bind_arguments).dialect
            fills.append((state.statement, dialect, mode, capture.info))
        return fill(state, capture, guard)

    def recording_derive(*args: Any) -> Any:
        template = derive(*args)
        derived.add(id(template))
        return template

    monkeypatch.setattr(_execute, "_fill", recording_fill)
    monkeypatch.setattr(_execute, "derive_template", recording_derive)
    yield
    for statement, dialect, mode, info in fills:
        learned = info.templates.get(mode)
        if learned is None or id(learned) in derived:
            continue
        try:
            made = derive_template(statement, dialect, mode)
        except Exception:  # e.g. a warning the suite turns into an error: the shape falls back
            made = None
        if made is None:
            _derivations["not derivable"] += 1
            continue
        _derivations["checked"] += 1
        assert template_signature(made) == template_signature(learned), statement


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _derivations["checked"] or _derivations["not derivable"]:
        terminalreporter.write_line(
            f"result layouts derived and checked against the learnt ones: {_derivations['checked']}, "
            f"not derivable: {_derivations['not derivable']}"
        )


# ---------------------------------------------------------------------------------------------
# A throwaway 3-master Redis Cluster for the whole session (tests/cluster.py), for the cluster
# backend's tests and the ``+cluster`` worlds.

from tests.cluster import RedisClusterProcs  # noqa: E402


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    require_redis_server("the Redis Cluster tests")
    cluster = RedisClusterProcs()
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    yield cluster
    cluster.close()
