"""Backend conformance: every backend must behave the same as seen through the ``Backend`` contract.

The contract's tests are the shipped kit (``sqlacache.testing.BackendTests``), run here once per
backend: in-process memory, real Redis through a sync client, real Redis through an asyncio client
(the body runs inside SQLAlchemy's ``greenlet_spawn``, as the sync core of an ``AsyncSession``
would), and fakeredis (sync and asyncio). What is Redis- or memory-specific stays here.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio
from redis.connection import Connection
from sqlalchemy.util.concurrency import greenlet_spawn

from sqlacache.backends import Backend, BackendError, Entry, MemoryBackend, RedisBackend
from sqlacache.backends.redis.backend import _glob_escape
from sqlacache.testing import TTL, BackendTests, ready


@dataclass
class Harness:
    name: str
    backend: Any  # MemoryBackend | RedisBackend; Any so the bodies can reach backend-specific bits
    prefix: str = ""
    raw: redis.Redis | None = None  # a sync client on the same server, for what a user can't do
    in_greenlet: bool = False

    async def run(self, body: Callable[[Harness], Any]) -> Any:
        if self.in_greenlet:
            return await greenlet_spawn(body, self)
        return body(self)

    @property
    def is_redis(self) -> bool:
        return self.raw is not None

    def evict_version(self, dep: str) -> None:
        """What Redis eviction / key expiry, or the memory backend's LRU, would do to a version."""
        if self.raw is not None:
            assert self.raw.delete(f"{self.prefix}:v:{dep}") == 1
        else:
            with self.backend._lock:
                del self.backend._versions[dep]


BACKENDS = ["memory", "redis-sync", "redis-asyncio", "fakeredis", "fakeredis-asyncio"]


def _wipe(raw: redis.Redis, prefix: str) -> None:
    for key in raw.scan_iter(match=f"{prefix}*", count=1000):
        raw.delete(key)


@pytest.fixture(params=BACKENDS)
async def h(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Harness]:
    kind: str = request.param
    if kind == "memory":
        yield Harness(kind, MemoryBackend())
        return
    if kind.startswith("redis"):
        url: str = request.getfixturevalue("redis_url")
        raw = redis.Redis.from_url(url)
        if kind == "redis-sync":
            client = redis.Redis.from_url(url)
            yield Harness(kind, RedisBackend(client, prefix=key_prefix), key_prefix, raw)
            client.close()
        else:
            # asyncio client only: every call must take the greenlet path, none can fall back to sync.
            aclient = redis.asyncio.Redis.from_url(url)
            backend = RedisBackend(async_client=aclient, prefix=key_prefix)
            yield Harness(kind, backend, key_prefix, raw, in_greenlet=True)
            await aclient.aclose()
        _wipe(raw, key_prefix)
        raw.close()
        return
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeRedis(server=server)
    if kind == "fakeredis":
        yield Harness(
            kind, RedisBackend(fakeredis.FakeRedis(server=server), prefix=key_prefix), key_prefix, raw
        )
    else:
        aclient = fakeredis.FakeAsyncRedis(server=server)
        backend = RedisBackend(async_client=aclient, prefix=key_prefix)
        yield Harness(kind, backend, key_prefix, raw, in_greenlet=True)
        await aclient.aclose()


def conformance(body: Callable[[Harness], None]) -> Callable[[Harness], Awaitable[None]]:
    """Turn a sync test body into a test run against every backend (in a greenlet where needed)."""

    async def test(h: Harness) -> None:
        await h.run(body)

    test.__name__ = test.__qualname__ = body.__name__
    test.__doc__ = body.__doc__
    return test


# -- the contract, on every backend: the kit (sqlacache.testing) --------------------------------------


class TestMemory(BackendTests):
    def make_backend(self) -> Backend:
        return MemoryBackend()

    def close_backend(self, backend: Backend) -> None:
        pass

    def evict_version(self, backend: Any, dep: str) -> None:
        with backend._lock:
            del backend._versions[dep]

    def entry_exists(self, backend: Any, key: str) -> bool:
        return len(backend) > 0

    def version_count(self, backend: Any) -> int:
        return len(backend._versions)


class _OnRedis(BackendTests):
    """The Redis flavours: a raw client on the same server does what a user can't (evict a version)."""

    raw: Any
    prefix: str

    def evict_version(self, backend: Backend, dep: str) -> None:
        assert self.raw.delete(f"{self.prefix}:v:{dep}") == 1

    def entry_exists(self, backend: Backend, key: str) -> bool:
        return bool(self.raw.exists(f"{self.prefix}:e:{key}"))

    def version_count(self, backend: Backend) -> int:
        return sum(1 for _ in self.raw.scan_iter(match=f"{_glob_escape(self.prefix)}:v:*", count=1000))


class _RealRedis(_OnRedis):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str, key_prefix: str) -> Iterator[None]:
        self.url, self.prefix = redis_url, key_prefix
        self.raw = redis.Redis.from_url(redis_url)
        yield
        _wipe(self.raw, key_prefix)
        self.raw.close()


class TestRedisSync(_RealRedis):
    def make_backend(self) -> Backend:
        self.client = redis.Redis.from_url(self.url)
        return RedisBackend(self.client, prefix=self.prefix)

    def close_backend(self, backend: Backend) -> None:
        self.client.close()


class TestRedisAsyncio(_RealRedis):
    """asyncio client only: every call must take the greenlet path, none can fall back to sync."""

    in_greenlet = True

    def make_backend(self) -> Backend:
        self.aclient = redis.asyncio.Redis.from_url(self.url)
        return RedisBackend(async_client=self.aclient, prefix=self.prefix)

    async def aclose_backend(self, backend: Backend) -> None:
        await self.aclient.aclose()


class _FakeRedis(_OnRedis):
    @pytest.fixture(autouse=True)
    def _server(self, key_prefix: str) -> None:
        self.server = fakeredis.FakeServer()
        self.raw = fakeredis.FakeRedis(server=self.server)
        self.prefix = key_prefix


class TestFakeRedis(_FakeRedis):
    def make_backend(self) -> Backend:
        return RedisBackend(fakeredis.FakeRedis(server=self.server), prefix=self.prefix)

    def close_backend(self, backend: Backend) -> None:
        pass


class TestFakeRedisAsyncio(_FakeRedis):
    in_greenlet = True

    def make_backend(self) -> Backend:
        self.aclient = fakeredis.FakeAsyncRedis(server=self.server)
        return RedisBackend(async_client=self.aclient, prefix=self.prefix)

    async def aclose_backend(self, backend: Backend) -> None:
        await self.aclient.aclose()


# -- Redis specifics (every Redis flavour) ------------------------------------------------------------


def redis_conformance(body: Callable[[Harness], None]) -> Any:
    """A conformance test of the Redis key layout: every Redis flavour, not the memory backend."""
    return pytest.mark.parametrize("h", [b for b in BACKENDS if b != "memory"], indirect=True)(
        conformance(body)
    )


def _redis_only(h: Harness) -> redis.Redis:
    assert h.raw is not None
    return h.raw


@redis_conformance
def test_redis_key_layout(h: Harness) -> None:
    raw = _redis_only(h)
    g = ready(h, ["t:a", "*"])
    assert h.backend.store("k", b"pay\nload", ["t:a", "*"], g, TTL)
    p = h.prefix
    assert raw.get(f"{p}:e:k") == f"{g}\x1ft:a\x1f*\n".encode() + b"pay\nload"
    assert int(raw.get(f"{p}:v:t:a") or 0) <= g
    assert int(raw.get(f"{p}:gen") or 0) >= g
    assert 0 < raw.pttl(f"{p}:e:k") <= TTL * 1000


@redis_conformance
def test_redis_clear_touches_only_this_prefix(h: Harness) -> None:
    raw = _redis_only(h)
    p = h.prefix
    g = ready(h, ["t:a"])
    assert h.backend.store("k", b"v", ["t:a"], g, TTL)
    foreign = {
        f"{p}-other:e:k": b"x",  # another prefix that merely starts with ours
        f"{p}:tenant:e:k": b"x",  # a nested prefix: not one of our key shapes
        f"{p}": b"x",
        f"foreign-{p}": b"x",
    }
    for key, value in foreign.items():
        raw.set(key, value)
    h.backend.clear()
    assert raw.keys(f"{p}:e:*") == []
    assert raw.keys(f"{p}:v:*") == []
    assert not raw.exists(f"{p}:gen")
    for key, value in foreign.items():
        assert raw.get(key) == value, key
    raw.delete(*foreign)


@redis_conformance
def test_redis_clear_escapes_glob_characters(h: Harness) -> None:
    raw = _redis_only(h)
    p = h.prefix
    h.backend.prefix = f"{p}[x]*?\\"
    g = ready(h, ["t:a"])
    assert h.backend.store("k", b"v", ["t:a"], g, TTL)
    raw.set(f"{p}x:e:k", b"would match an unescaped pattern")
    assert raw.keys(_glob_escape(h.backend.prefix) + ":*") == raw.keys(f"{p}\\[*")
    h.backend.clear()
    assert h.backend.lookup("k").entry is None
    assert raw.get(f"{p}x:e:k") is not None
    assert raw.keys(f"{p}\\[*") == []


@redis_conformance
def test_redis_corrupt_entries_are_misses_and_deleted(h: Harness) -> None:
    raw = _redis_only(h)
    p = h.prefix
    g = ready(h, ["t:a"])
    garbage = {
        "no-newline": b"garbage",
        "bad-generation": b"12x\x1ft:a\npayload",
        "empty-generation": b"\x1ft:a\npayload",
        # The script passes it (the dependency has a version), the client cannot decode it.
        "non-utf8-dep": f"{g}\x1f".encode() + b"t:\xff\npayload",
    }
    raw.set(f"{p}:v:".encode() + b"t:\xff", g)
    for key, value in garbage.items():
        raw.set(f"{p}:e:{key}", value)
    raw.hset(f"{p}:e:wrong-type", "a", "b")
    raw.set(f"{p}:e:unknown-dep", f"{g}\x1ft:nobody\npayload")  # merely invalid, not corrupt
    for key in [*garbage, "wrong-type", "unknown-dep"]:
        result = h.backend.lookup(key)
        assert result.entry is None and result.generation > 0, key
        assert not raw.exists(f"{p}:e:{key}"), key
    assert h.backend.corrupt_entries == len(garbage) + 1
    # A damaged version or counter reads as missing: misses and refusals, never an exception.
    assert h.backend.store("k", b"v", ["t:a"], g, TTL)
    raw.set(f"{p}:v:t:a", b"not a number")
    assert h.backend.lookup("k").entry is None
    raw.set(f"{p}:gen", b"1e99")
    g2 = h.backend.lookup("k").generation
    assert h.backend.store("k", b"v", ["t:a"], g2, TTL) is False  # the damaged version was replaced
    h.backend.bump(["t:a"])
    g3 = h.backend.generation()
    assert g3 > g2
    assert h.backend.store("k", b"v", ["t:a"], g3, TTL) is True


@redis_conformance
def test_redis_versions_outlive_their_entries(h: Harness) -> None:
    raw = _redis_only(h)
    p = h.prefix
    g = ready(h, ["t:short", "t:long", "t:forever"])
    raw.pexpire(f"{p}:v:t:short", 5_000)
    raw.persist(f"{p}:v:t:forever")
    long_ttl = raw.pttl(f"{p}:v:t:long")
    assert long_ttl > 6 * 86400 * 1000  # the default version TTL is a week
    assert h.backend.store("k", b"v", ["t:short", "t:long", "t:forever"], g, 3600)
    assert raw.pttl(f"{p}:v:t:short") > 3_590_000  # extended to the entry's TTL
    assert raw.pttl(f"{p}:v:t:long") > long_ttl - 60_000  # never shortened
    assert raw.pttl(f"{p}:v:t:forever") == -1
    # A bump keeps the extended TTL.
    h.backend.bump(["t:short"])
    assert raw.pttl(f"{p}:v:t:short") > 3_590_000


@redis_conformance
def test_redis_lost_generation_counter_resumes_above(h: Harness) -> None:
    raw = _redis_only(h)
    ready(h, ["t:a"])
    g = h.backend.lookup("k").generation
    raw.delete(f"{h.prefix}:gen")  # evicted
    assert h.backend.generation() >= g
    h.backend.bump(["t:a"])
    assert h.backend.store("k", b"stale", ["t:a"], g, TTL) is False
    assert h.backend.generation() > g


@redis_conformance
def test_redis_counter_ahead_of_clock_still_increases(h: Harness) -> None:
    # Bumps faster than one per microsecond run the counter ahead of the clock; it must keep counting.
    raw = _redis_only(h)
    ready(h, ["t:a"])
    ahead = h.backend.generation() + 10**9
    raw.set(f"{h.prefix}:gen", ahead)
    g = h.backend.lookup("k").generation
    assert g == ahead
    h.backend.bump(["t:a"])
    assert h.backend.store("k", b"stale", ["t:a"], g, TTL) is False
    assert h.backend.generation() == ahead + 1


# -- memory specifics ------------------------------------------------------------------------------


def test_memory_lru_bound_and_hits_refresh_recency() -> None:
    backend = MemoryBackend(max_entries=3)
    backend.store("_", b"", ["t:a"], 0, TTL)
    g = backend.generation()
    for key in ("a", "b", "c"):
        assert backend.store(key, key.encode(), ["t:a"], g, TTL)
    assert backend.lookup("a").entry is not None  # "a" is now the most recently used
    assert backend.store("d", b"d", ["t:a"], g, TTL)
    assert len(backend) == 3
    assert backend.lookup("b").entry is None  # the least recently used went
    assert [k for k in "acd" if backend.lookup(k).entry is not None] == ["a", "c", "d"]


def test_memory_version_table_bound_is_safe() -> None:
    backend = MemoryBackend(max_versions=2)
    backend.store("_", b"", ["t:a"], 0, TTL)
    g = backend.generation()
    assert backend.store("k", b"v", ["t:a"], g, TTL)
    backend.store("_", b"", ["t:b", "t:c"], 0, TTL)  # pushes t:a out of the version table
    assert backend.lookup("k").entry is None
    g = backend.lookup("k").generation
    assert backend.store("k", b"v", ["t:a"], g, TTL) is False
    assert backend.store("k", b"v", ["t:a"], backend.lookup("k").generation, TTL) is True


def test_memory_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        MemoryBackend(max_entries=0)


# -- no stale value survives under real concurrency -------------------------------------------------


@dataclass
class World:
    """The "database": ``truth`` changes, then the writer bumps (commit, then invalidate)."""

    truth: int = 0
    committed: int = 0  # the highest truth whose bump has completed
    lock: threading.Lock = field(default_factory=threading.Lock)
    stores: int = 0
    refusals: int = 0
    hits: int = 0


KEYS = ["q0", "q1", "q2"]
DEP = "t:counter"


def _writer(backend: Backend, world: World, rounds: int, pause: Callable[[], None]) -> None:
    for _ in range(rounds):
        with world.lock:
            world.truth += 1
            mine = world.truth
        pause()
        backend.bump([DEP])
        with world.lock:
            world.committed = max(world.committed, mine)


def _reader_step(backend: Backend, world: World, key: str, pause: Callable[[], None]) -> None:
    with world.lock:
        committed = world.committed
    result = backend.lookup(key)
    if result.entry is not None:
        # Never serve data older than a commit that finished before the lookup began.
        assert int(result.entry.payload) >= committed, (result.entry.payload, committed)
        world.hits += 1
        return
    with world.lock:
        value = world.truth  # the database read
    pause()
    stored = backend.store(key, str(value).encode(), [DEP], result.generation, TTL)
    world.stores += 1
    world.refusals += not stored


def _assert_no_stale_survivor(backend: Backend, world: World) -> None:
    for key in KEYS:
        entry = backend.lookup(key).entry
        if entry is not None:
            assert int(entry.payload) == world.truth, (key, entry.payload, world.truth)


@pytest.fixture
def switch_often() -> Iterator[None]:
    # Make the GIL hand over far more often, so threads interleave inside the backends' methods.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


@pytest.mark.parametrize("kind", ["memory", "redis-sync"])
def test_concurrent_readers_and_writers_threads(
    kind: str, request: pytest.FixtureRequest, key_prefix: str
) -> None:
    if kind == "memory":
        backend: Any = MemoryBackend()
        request.getfixturevalue("switch_often")
        rounds = 400
    else:
        raw = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        request.addfinalizer(lambda: (_wipe(raw, key_prefix), raw.close()))
        backend = RedisBackend(raw, prefix=key_prefix)
        rounds = 150
    world = World()
    done = threading.Event()
    errors: list[BaseException] = []

    def pause() -> None:
        if random.random() < 0.3:
            time.sleep(0)

    def reader() -> None:
        try:
            while not done.is_set():
                _reader_step(backend, world, random.choice(KEYS), pause)
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            _writer(backend, world, rounds, pause)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    writers = [threading.Thread(target=writer) for _ in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors
    _assert_no_stale_survivor(backend, world)
    # Readers that come after the last commit cache the final value.
    for key in KEYS:
        _reader_step(backend, world, key, lambda: None)
        _reader_step(backend, world, key, lambda: None)
        assert backend.lookup(key).entry == Entry(str(world.truth).encode(), (DEP,))
    assert world.stores > 0


async def test_concurrent_readers_and_writers_asyncio(redis_url: str, key_prefix: str) -> None:
    """The same, as asyncio tasks each running sync code in SQLAlchemy's greenlet."""
    aclient = redis.asyncio.Redis.from_url(redis_url)
    backend = RedisBackend(async_client=aclient, prefix=key_prefix)
    world = World()
    done = False

    def reader() -> None:
        while not done:
            _reader_step(backend, world, random.choice(KEYS), lambda: None)

    async def writer() -> None:
        for _ in range(100):
            await greenlet_spawn(_writer, backend, world, 1, lambda: None)
            await asyncio.sleep(0)

    try:
        readers = [asyncio.ensure_future(greenlet_spawn(reader)) for _ in range(4)]
        await asyncio.gather(writer(), writer())
        done = True
        await asyncio.gather(*readers)
        await greenlet_spawn(_assert_no_stale_survivor, backend, world)
        assert world.stores > 0
    finally:
        raw = redis.Redis.from_url(redis_url)
        _wipe(raw, key_prefix)
        raw.close()
        await aclient.aclose()


# -- Redis: round trips, failures, dispatch --------------------------------------------------------


class CountingConnection(Connection):
    """Counts what goes over the wire: commands sent and replies read (a reply = a round trip)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []
        self.replies = 0

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(str(args[0]).upper())
        super().send_command(*args, **kwargs)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        self.replies += 1
        return super().read_response(*args, **kwargs)


def test_redis_lookup_is_one_round_trip(redis_url: str, key_prefix: str) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection, max_connections=1)
    client = redis.Redis(connection_pool=pool)
    backend = RedisBackend(client, prefix=key_prefix)
    try:
        g = ready(Harness("redis-sync", backend), ["t:a", "t:b", "*"])
        assert backend.store("k", b"v", ["t:a", "t:b", "*"], g, TTL)
        backend.lookup("k")  # connects and loads the script
        conn = pool.get_connection()
        pool.release(conn)
        assert isinstance(conn, CountingConnection)
        for key, hit in (("k", True), ("missing", False)):
            conn.sent, conn.replies = [], 0
            result = backend.lookup(key)
            assert (result.entry is not None) is hit
            assert conn.sent == ["EVALSHA"]
            assert conn.replies == 1
    finally:
        _wipe(client, key_prefix)
        client.close()


@pytest.mark.parametrize("in_greenlet", [False, True], ids=["sync", "asyncio"])
async def test_unreachable_redis_raises_backend_error_fast(in_greenlet: bool) -> None:
    backend = RedisBackend.from_url("redis://127.0.0.1:1/0")
    calls: list[Callable[[], object]] = [
        lambda: backend.lookup("k"),
        lambda: backend.generation(),
        lambda: backend.store("k", b"v", ["t:a"], 1, TTL),
        lambda: backend.bump(["t:a"]),
        lambda: backend.delete(["k"]),
        lambda: backend.clear(),
    ]

    def check() -> None:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendError) as info:
                call()
            assert time.monotonic() - started < 1.0
            assert isinstance(info.value.__cause__, (redis.RedisError, OSError, TimeoutError))

    if in_greenlet:
        await greenlet_spawn(check)
        await backend.aclose()
    else:
        check()
        backend.close()


def test_asyncio_only_backend_outside_greenlet_says_how_to_fix() -> None:
    backend = RedisBackend(async_client=fakeredis.FakeAsyncRedis())
    with pytest.raises(BackendError, match="sync client"):
        backend.lookup("k")


async def test_greenlet_calls_use_the_asyncio_client(redis_url: str, key_prefix: str) -> None:
    # The sync client points nowhere: only the asyncio client can make these calls succeed.
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    aclient = redis.asyncio.Redis.from_url(redis_url)
    backend = RedisBackend(dead, async_client=aclient, prefix=key_prefix)

    def body() -> None:
        g = ready(Harness("both", backend), ["t:a"])
        assert backend.store("k", b"v", ["t:a"], g, TTL)
        assert backend.lookup("k").entry == Entry(b"v", ("t:a",))
        backend.clear()

    try:
        await greenlet_spawn(body)
        with pytest.raises(BackendError):
            backend.lookup("k")  # outside the greenlet: the sync client, which fails
    finally:
        await aclient.aclose()
        dead.close()


async def test_from_url_serves_sync_and_async_callers(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend.from_url(redis_url, prefix=key_prefix)
    try:
        g = ready(Harness("sync", backend), ["t:a"])
        assert backend.store("k", b"v", ["t:a"], g, TTL)
        result = await greenlet_spawn(backend.lookup, "k")
        assert result.entry == Entry(b"v", ("t:a",))
        await greenlet_spawn(backend.bump, ["t:a"])
        assert backend.lookup("k").entry is None
        await greenlet_spawn(backend.clear)
    finally:
        await backend.aclose()
    with pytest.raises(BackendError):
        backend.lookup("k")


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "asyncio"])
async def test_script_cache_flush_is_survived(use_async: bool) -> None:
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeRedis(server=server)
    if use_async:
        backend = RedisBackend(async_client=fakeredis.FakeAsyncRedis(server=server))
    else:
        backend = RedisBackend(fakeredis.FakeRedis(server=server))

    def body() -> None:
        backend.lookup("k")
        raw.script_flush()
        assert backend.lookup("k").entry is None
        backend.bump(["t:a"])
        assert backend.store("k", b"v", ["t:a"], backend.generation(), TTL)

    if use_async:
        await greenlet_spawn(body)
    else:
        body()


def test_decode_responses_client_is_rejected() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisBackend(fakeredis.FakeRedis(decode_responses=True))
    # Entries name their dependencies in UTF-8; the scripts use those names as keys.
    with pytest.raises(ValueError, match=r"encoding='utf-8'.*'latin-1'"):
        RedisBackend(redis.Redis(encoding="latin-1"))
    with pytest.raises(ValueError, match="encoding='utf-8'"):
        RedisBackend(async_client=redis.asyncio.Redis(encoding="cp1252"))
    RedisBackend(redis.Redis(encoding="UTF8")).close()  # another spelling of the same
    with pytest.raises(ValueError):
        RedisBackend()


@pytest.mark.parametrize("h", ["redis-asyncio", "fakeredis-asyncio"], indirect=True)
async def test_alookup_on_the_event_loop_agrees_with_lookup(h: Harness) -> None:
    """CachingAsyncSession.get awaits alookup directly (no greenlet); it must answer like lookup."""
    backend = h.backend
    await h.run(lambda h: h.backend.store("_", b"", ["t:a", "*"], 0, TTL))
    miss = await backend.alookup("k", ["t:a", "*"])
    assert miss.entry is None
    assert await h.run(lambda h: h.backend.store("k", b"v\n1", ["t:a", "*"], miss.generation, TTL))
    for hint in (["t:a", "*"], ["*"], []):
        hit = await backend.alookup("k", hint)
        assert hit.entry is not None and hit.entry.payload == b"v\n1"
    await h.run(lambda h: h.backend.bump(["t:a"]))
    assert (await backend.alookup("k", ["t:a", "*"])).entry is None


def _lookup_in_child(backend: RedisBackend, out: Any) -> None:
    out.put(backend.lookup("k").entry is not None)


def _store_in_child(backend: RedisBackend, out: Any) -> None:
    """A store sent without waiting from a forked child (on a connection of the child's own), and
    no further command from it."""
    g = backend.lookup("child", ["t:a"]).generation
    out.put(backend.send_store("child", b"c", ["t:a"], g, TTL))
    time.sleep(1.0)


def test_redis_own_connections_survive_a_server_close_and_a_fork(redis_url: str, key_prefix: str) -> None:
    """The read path's lookup and the stores sent without waiting use connections of their own
    (backends/redis/own.py): one the server closed is reconnected; a forked child makes its own."""
    import multiprocessing

    client = redis.Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=key_prefix)
    killer = redis.Redis.from_url(redis_url)
    try:
        g = backend.lookup("k", ["t:a"]).generation
        assert backend.send_store("k", b"v", ["t:a"], g, TTL)
        assert backend.store_replies() == [True]
        assert backend.lookup("k").entry == Entry(b"v", ("t:a",))
        killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert backend.lookup("k").entry == Entry(b"v", ("t:a",))  # reconnected, no error
        killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert backend.send_store("k2", b"w", ["t:a"], g, TTL) in (True, False)
        replies = backend.store_replies()  # the store's connection was closed: a failure, not a hang
        assert all(r is True or isinstance(r, BackendError) for r in replies), replies
        out = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=_lookup_in_child, args=(backend, out))
        child.start()
        assert out.get(timeout=20) is True
        child.join(20)
        assert backend.lookup("k").entry == Entry(b"v", ("t:a",))  # the parent's own still works
        child = multiprocessing.get_context("fork").Process(target=_store_in_child, args=(backend, out))
        child.start()
        assert out.get(timeout=20) is True
        assert _landed(client, f"{key_prefix}:e:child", within=0.9) is not None  # before it exits
        child.join(20)
    finally:
        _wipe(client, key_prefix)
        backend.close()
        client.close()
        killer.close()


def test_redis_own_connections_name_the_keys_the_client_names(redis_url: str, key_prefix: str) -> None:
    """The lookup and the stores written on connections of our own (own.py packs their commands
    itself) name the same keys as the client's own calls: a dependency outside ASCII bumped through
    the client is seen by the lookup."""
    client = redis.Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=key_prefix)
    try:
        deps = ["t:café", "r:café:ü", "*"]
        found, token = backend.lease("clé", 1.0, deps)
        assert found.entry is None and isinstance(token, str)
        assert backend.send_store("clé", b"v", deps, found.generation, TTL, lease=token)
        assert backend.store_replies() == [True]
        assert backend.lease("clé", 1.0, deps)[0].entry == Entry(b"v", tuple(deps))
        assert client.exists(f"{key_prefix}:e:clé") == 1  # the key the client itself spells
        backend.bump(["r:café:ü"])
        assert backend.lease("clé", 1.0, deps)[0].entry is None
    finally:
        _wipe(client, key_prefix)
        backend.close()
        client.close()


def test_threads_that_come_and_go_never_use_up_the_clients_pool(redis_url: str, key_prefix: str) -> None:
    """Each thread's lookups run on a connection of its own (own.py), gone with the thread: a server
    that starts a thread per request must not run out of connections after max_connections threads."""
    client = redis.Redis.from_url(redis_url, max_connections=4)
    backend = RedisBackend(client, prefix=key_prefix)
    try:
        g = backend.lookup("k", ["t:a"]).generation
        assert backend.store("k", b"v", ["t:a"], g, TTL)
        failures: list[BaseException] = []

        def read() -> None:
            try:
                assert backend.lease("k", 1.0, ["t:a"])[0].entry == Entry(b"v", ("t:a",))
            except BaseException as exc:
                failures.append(exc)

        for _ in range(30):  # one thread after another, as a thread-per-request server makes them
            thread = threading.Thread(target=read)
            thread.start()
            thread.join(10)
        assert not failures, failures[:3]
    finally:
        _wipe(client, key_prefix)
        backend.close()
        client.close()


def _landed(client: redis.Redis, key: str, within: float = 2.0) -> float | None:
    """How long until ``key`` exists in Redis (None: not within ``within`` seconds)."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if client.exists(key):
            return time.monotonic() - began
        time.sleep(0.001)
    return None


def test_a_store_sent_without_waiting_lands_with_no_further_command(redis_url: str, key_prefix: str) -> None:
    """A miss's store is sent without waiting for its reply (own.py); from a thread that then goes
    quiet — idle, or gone — it still lands, and gives its lease back."""
    client = redis.Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=key_prefix)
    try:
        done = threading.Event()

        def quiet_after_a_miss(key: str, then: Callable[[], None]) -> None:
            found, token = backend.lease(key, 30.0, ["t:a"])
            assert found.entry is None and isinstance(token, str)
            assert backend.send_store(key, b"v", ["t:a"], found.generation, TTL, lease=token)
            then()

        idle = threading.Thread(target=quiet_after_a_miss, args=("idle", lambda: done.wait(10)))
        idle.start()
        gone = threading.Thread(target=quiet_after_a_miss, args=("gone", lambda: None))
        gone.start()
        gone.join(10)
        for key in ("idle", "gone"):
            assert _landed(client, f"{key_prefix}:e:{key}") is not None, (
                f"the {key} thread's store never landed"
            )
            assert client.exists(f"{key_prefix}:l:{key}") == 0  # the lease went with the store
        done.set()
        idle.join(10)
        assert backend.store_replies() == [True, True]
    finally:
        _wipe(client, key_prefix)
        backend.close()
        client.close()


def _named(raw: redis.Redis, name: str) -> int:
    """How many connections named ``name`` the server has open."""
    return sum(1 for c in raw.client_list() if c.get("name") == name)


async def test_async_own_connections_survive_a_server_close_a_script_flush_and_a_cancelled_call(
    redis_url: str, key_prefix: str
) -> None:
    """With an asyncio client the lookup and the store run on connections of our own too
    (own.py, ``AsyncConnections``): one the server closed is reconnected, a flushed script is
    loaded again, and a call cancelled while Redis holds its reply leaves nothing behind that the
    next call could read as its own."""
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2)
    backend = RedisBackend(async_client=client, prefix=key_prefix)
    admin = redis.Redis.from_url(redis_url)
    try:
        found, token = await backend.alease("k", 5.0, ["t:a"])
        assert found.entry is None and isinstance(token, str)
        assert await backend.astore("k", b"v", ["t:a"], found.generation, TTL, lease=token)
        assert (await backend.alease("k", 5.0, ["t:a"]))[0].entry == Entry(b"v", ("t:a",))
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert (await backend.alease("k", 5.0, ["t:a"]))[0].entry == Entry(b"v", ("t:a",))
        admin.script_flush()
        assert (await backend.alease("k", 5.0, ["t:a"]))[0].entry == Entry(b"v", ("t:a",))
        found, token = await backend.alease("other", 5.0, ["t:a"])
        assert await backend.astore("other", b"w", ["t:a"], found.generation, TTL, lease=token)

        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")  # Redis holds every other client's reply
        held = asyncio.ensure_future(backend.alease("k", 5.0, ["t:a"]))
        await asyncio.sleep(0.05)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        await asyncio.sleep(0.4)  # the cancelled call's reply has been sent by now
        for _ in range(3):
            assert (await backend.alease("other", 5.0, ["t:a"]))[0].entry == Entry(b"w", ("t:a",))
            assert (await backend.alease("k", 5.0, ["t:a"]))[0].entry == Entry(b"v", ("t:a",))
    finally:
        _wipe(admin, key_prefix)
        await backend.aclose()
        await client.aclose()
        admin.close()


async def test_async_calls_beyond_the_own_connections_use_the_clients_pool_and_close_leaves_none(
    redis_url: str, key_prefix: str
) -> None:
    """At most 16 connections of our own are open at once (``most``): more concurrent calls than
    that go through the client, all answered right; no connection is opened for nothing, and after
    ``aclose()`` (and the client's) none is left."""
    from sqlacache.backends.redis.own import AsyncConnections

    few = AsyncConnections(redis.asyncio.Redis.from_url(redis_url), most=2)
    first, second = few.take(), few.take()
    assert first is not None and second is not None and few.take() is None  # the client's turn
    few.give_back(first)
    assert few.take() is first

    name = f"{key_prefix}-conns"
    client = redis.asyncio.Redis.from_url(redis_url, client_name=name, socket_timeout=2)
    backend = RedisBackend(async_client=client, prefix=key_prefix)
    admin = redis.Redis.from_url(redis_url)
    try:
        for i in range(40):
            found, token = await backend.alease(f"k{i}", 5.0, ["t:a"])
            assert await backend.astore(f"k{i}", b"%d" % i, ["t:a"], found.generation, TTL, lease=token)

        async def read(i: int) -> bytes | None:
            entry = (await backend.alease(f"k{i}", 5.0, ["t:a"]))[0].entry
            return entry.payload if entry is not None else None

        for _ in range(5):
            got = await asyncio.gather(*(read(i) for i in range(40)))
            assert got == [b"%d" % i for i in range(40)]
        assert _named(admin, name) <= 40  # one per call in flight at most, ours and the pool's
        await backend.aclose()
        await client.aclose()
        assert _named(admin, name) == 0
    finally:
        _wipe(admin, key_prefix)
        admin.close()


def test_a_store_sent_without_waiting_lands_after_a_script_flush_and_a_new_connection(
    redis_url: str, key_prefix: str
) -> None:
    """The replies of stores sent without waiting are read late (several at a time), so a store
    Redis answers with NOSCRIPT would only be run again then: the store script is loaded on every
    new connection of the sender, and again with the lookup's after a flush. After a flush the
    next store lands at once; after the server closed the sender's connection, the store written
    on it is lost (as a write to any closed socket is) and the next one reconnects and lands."""
    client = redis.Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=key_prefix)
    admin = redis.Redis.from_url(redis_url)

    def kill() -> None:
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    def miss_and_store(key: str, lease: bool = True) -> bool:
        if lease:
            found, token = backend.lease(key, 5.0, ["t:a"])
            assert found.entry is None and isinstance(token, str)
        else:  # (without a lease a miss whose versions exist is answered by an MGET: no script)
            found, token = backend.lookup(key, ["t:a"]), None
            assert found.entry is None
        try:
            assert backend.send_store(key, b"v", ["t:a"], found.generation, TTL, lease=token)
        except BackendError:  # the write itself failed (a closed socket): nothing sent
            return False
        return _landed(client, f"{key_prefix}:e:{key}", within=1.0) is not None

    try:
        assert miss_and_store("first")
        admin.script_flush()
        assert miss_and_store("after a flush")
        for n, upset in enumerate([kill, lambda: (admin.script_flush(), kill())]):
            upset()
            tries = [miss_and_store(f"after a kill {n} {i}") for i in range(3)]
            assert tries[1:] == [True, True], tries
        admin.script_flush()
        kill()
        tries = [miss_and_store(f"no script run {i}", lease=False) for i in range(3)]
        assert tries[1:] == [True, True], tries
    finally:
        _wipe(client, key_prefix)
        backend.close()
        client.close()
        admin.close()


def test_a_backend_called_from_a_second_event_loop_answers_there_with_its_sync_client(
    redis_url: str, key_prefix: str
) -> None:
    """An asyncio client belongs to the event loop it first ran on. A backend with both clients
    that is called from another live loop (a commit there evicts through every cache of its
    database in the process) answers with its sync client there: right answers on both loops, and
    ``aclose()`` on the first loop finds no connection of another loop's."""
    backend = RedisBackend.from_url(redis_url, prefix=key_prefix)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    raw = redis.Redis.from_url(redis_url)
    try:
        g = first.run_until_complete(backend.alookup("k", ["t:a"])).generation  # binds the client
        assert backend.store("k", b"v", ["t:a"], g, TTL)
        for loop in (second, first, second):
            assert loop.run_until_complete(backend.alookup("k", ["t:a"])).entry == Entry(b"v", ("t:a",))
            found = loop.run_until_complete(greenlet_spawn(backend.lookup, "k", ["t:a"]))
            assert found.entry == Entry(b"v", ("t:a",))
        second.run_until_complete(greenlet_spawn(backend.bump, ["t:a"]))
        assert first.run_until_complete(backend.alookup("k", ["t:a"])).entry is None
        first.run_until_complete(backend.aclose())  # raises if a connection belonged to `second`
    finally:
        _wipe(raw, key_prefix)
        raw.close()
        first.close()
        second.close()
