"""Redis down, paused or holding garbage: reads still return correct data and never raise."""

from __future__ import annotations

import time

import redis
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession
from tests.helpers import cached, seed, until
from tests.models import Base, User


def _world(tmp_path, backend, **kw):
    engine = create_engine(f"sqlite:///{tmp_path / 'o.db'}")
    Base.metadata.create_all(engine)
    cache = Cache(backend=backend, **kw)

    class W:
        pass

    w = W()
    w.engine, w.cache, w.sql = engine, cache, []
    w.statements = lambda: len(w.sql)
    from sqlalchemy import event

    event.listen(engine, "before_cursor_execute", lambda *a: w.sql.append(a[2]))
    w.Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    return w


def test_unreachable_redis_reads_and_writes_go_on(tmp_path):
    w = _world(tmp_path, "redis://127.0.0.1:1/0")
    seed(w)
    started = time.monotonic()
    for _ in range(3):
        with w.Session() as s:
            assert s.get(User, 1).name == "u1"
            assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
    with w.Session() as s:
        s.get(User, 1).name = "changed"
        s.commit()  # the database committed; the eviction is kept for later
    with w.Session() as s:
        assert s.get(User, 1).name == "changed"
    stats = w.cache.stats()
    assert stats["errors"] > 0 and stats["hits"] == 0
    assert stats["pending_invalidations"] > 0
    assert time.monotonic() - started < 5


def test_paused_redis_never_serves_what_a_lost_invalidation_would_evict(tmp_path, fresh_redis):
    w = _world(
        tmp_path, redis.Redis.from_url(fresh_redis.url, socket_timeout=0.1, socket_connect_timeout=0.1)
    )
    seed(w)
    for _ in range(2):
        with w.Session() as s:
            s.get(User, 1)
    fresh_redis.pause()
    try:
        with w.Session() as s:
            s.get(User, 1, execution_options={"cache": False}).name = "while-paused"
            s.commit()
        assert w.cache.stats()["pending_invalidations"] > 0
        with w.Session() as s:
            assert s.get(User, 1).name == "while-paused"
    finally:
        fresh_redis.resume()
    deadline = time.monotonic() + 10
    while w.cache.stats()["pending_invalidations"] and time.monotonic() < deadline:
        with w.Session() as s:  # meanwhile reads go to the database
            assert s.get(User, 1).name == "while-paused"
        time.sleep(0.02)
    assert w.cache.stats()["pending_invalidations"] == 0  # delivered on its own, before any hit
    with w.Session() as s:
        assert s.get(User, 1).name == "while-paused"


def test_corrupt_entry_is_a_miss_deleted_and_counted(tmp_path, redis_url, key_prefix):
    client = redis.Redis.from_url(redis_url)
    w = _world(tmp_path, client, prefix=key_prefix)
    seed(w)
    for _ in range(2):
        with w.Session() as s:
            s.get(User, 2)
    keys = list(client.scan_iter(f"{key_prefix}:e:*"))
    assert keys
    for key in keys:
        header, _, _ = client.get(key).partition(b"\n")
        client.set(key, header + b"\n" + b'[1, [["tests.models.User", {"id": "not an int"}, {}]], [0]]')
    try:
        with w.Session() as s:
            assert s.get(User, 2).name == "u2"
        assert w.cache.stats()["corrupt"] == 1
        assert all(client.get(k) is None or b"not an int" not in client.get(k) for k in keys)
    finally:
        w.cache.invalidate_all()


def test_a_bug_in_the_read_path_falls_back_to_the_database(tmp_path, monkeypatch):
    w = _world(tmp_path, "memory://")
    seed(w)

    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(w.cache.keys, "key", broken)
    monkeypatch.setattr(w.cache.keys, "get_key", broken)
    for _ in range(2):
        with w.Session() as s:
            assert s.get(User, 1).name == "u1"
            assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
    assert w.cache.stats()["errors.internal"] >= 2


def test_a_bug_while_storing_still_returns_the_rows(tmp_path, monkeypatch):
    w = _world(tmp_path, "memory://")
    seed(w)
    monkeypatch.setattr(
        w.cache.io, "submit_store", lambda *a: (_ for _ in ()).throw(RuntimeError("injected"))
    )
    for _ in range(2):
        with w.Session() as s:
            assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
    assert w.cache.stats()["errors.internal"] == 2


def test_a_bug_while_recording_a_write_evicts_everything_at_commit(tmp_path, monkeypatch):
    from sqlacache.analysis import dependencies
    from tests.helpers import cached
    from tests.models import Tag

    w = _world(tmp_path, "memory://")
    seed(w)
    cached(w, lambda s: [t.label for t in s.scalars(select(Tag).order_by(Tag.id))])
    cached(w, lambda s: s.get(User, 2).name)
    monkeypatch.setattr(
        dependencies, "row_write_deps", lambda *a: (_ for _ in ()).throw(RuntimeError("injected"))
    )
    with w.Session() as s:
        s.get(User, 2).name = "written"
        s.commit()  # the write itself succeeds
    monkeypatch.undo()
    with w.Session() as s:
        assert s.get(User, 2).name == "written"
    before = w.cache.stats()["misses"]
    with w.Session() as s:
        [t.label for t in s.scalars(select(Tag))]
    assert w.cache.stats()["misses"] == before + 1  # everything was evicted, unrelated tables too


# ---------------------------------------------------------------------------------------------
# Breaking a real Redis: every fault, on SQLite and PostgreSQL, sync and async.

import asyncio  # noqa: E402
import contextlib  # noqa: E402

import pytest  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402

from sqlacache import CachingAsyncSession  # noqa: E402
from tests.conftest import _pg_schema_url, _truncate_sync  # noqa: E402

DRIVERS = ["sqlite", "postgres", "aiosqlite", "asyncpg"]


class Driver:
    """One application process: an engine, a cache on ``redis_url``, and the reads and writes a
    request makes — the same calls sync or async (async ones run on one private event loop)."""

    def __init__(self, kind, request, tmp_path, redis_url, prefix, **cache_kw):
        self.kind = kind
        self.is_async = kind in ("aiosqlite", "asyncpg")
        self.loop = asyncio.new_event_loop() if self.is_async else None
        if kind in ("sqlite", "aiosqlite"):
            driver = "sqlite+aiosqlite" if self.is_async else "sqlite"
            url, args = f"{driver}:///{tmp_path / 'faults.db'}", {}
        else:
            base = request.getfixturevalue("pg_async_url" if self.is_async else "pg_sync_url")
            url, args = _pg_schema_url(base, request.getfixturevalue("pg_schema"))
        self.sql = []
        if self.is_async:
            self.engine = create_async_engine(url, connect_args=args)
            sync_engine = self.engine.sync_engine
        else:
            self.engine = sync_engine = create_engine(url, connect_args=args)
        from sqlalchemy import event

        event.listen(sync_engine, "before_cursor_execute", lambda *a: self.sql.append(a[2]))
        self.cache = Cache(backend=redis_url, prefix=prefix, **cache_kw)
        if self.is_async:
            self.Session = async_sessionmaker(
                self.engine, class_=CachingAsyncSession, cache=self.cache, expire_on_commit=False
            )
        else:
            self.Session = sessionmaker(self.engine, class_=CachingSession, cache=self.cache)

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    def create(self):
        if self.is_async:

            async def go():
                async with self.engine.begin() as conn:
                    await conn.run_sync(Base.metadata.create_all)
                    await conn.run_sync(
                        lambda c: [c.execute(t.delete()) for t in reversed(Base.metadata.sorted_tables)]
                    )
                async with self.Session() as s:
                    s.add_all([User(id=i, name=f"u{i}") for i in (1, 2, 3)])
                    await s.commit()

            self._run(go())
            return
        Base.metadata.create_all(self.engine)
        _truncate_sync(self.engine)
        with self.Session() as s:
            s.add_all([User(id=i, name=f"u{i}") for i in (1, 2, 3)])
            s.commit()

    def get(self, pk):
        if self.is_async:

            async def go():
                async with self.Session() as s:
                    return (await s.get(User, pk)).name

            return self._run(go())
        with self.Session() as s:
            return s.get(User, pk).name

    def names(self):
        statement = select(User.name).order_by(User.id)
        if self.is_async:

            async def go():
                async with self.Session() as s:
                    return list((await s.scalars(statement)).all())

            return self._run(go())
        with self.Session() as s:
            return list(s.scalars(statement))

    def rename(self, pk, name):
        if self.is_async:

            async def go():
                async with self.Session() as s:
                    (await s.get(User, pk, execution_options={"cache": False})).name = name
                    await s.commit()

            return self._run(go())
        with self.Session() as s:
            s.get(User, pk, execution_options={"cache": False}).name = name
            s.commit()

    def retry_pending(self):
        if self.is_async:
            return self._run(self.cache.aretry_pending())
        return self.cache.retry_pending()

    def close(self):
        if self.is_async:
            self._run(self.cache.aclose())
            self._run(self.engine.dispose())
            self.loop.close()
        else:
            self.cache.close()
            self.engine.dispose()


@pytest.fixture(params=DRIVERS)
def app(request, tmp_path, proxy, key_prefix):
    """An application process whose cache talks to the throwaway Redis through the proxy."""
    driver = Driver(request.param, request, tmp_path, proxy.url, key_prefix)
    driver.create()
    yield driver
    driver.close()


@contextlib.contextmanager
def _killed(server, proxy):
    server.stop()
    yield
    server.start()


@contextlib.contextmanager
def _paused(server, proxy):
    with server.paused():
        yield


@contextlib.contextmanager
def _refusing(server, proxy):
    proxy.refuse(True)
    proxy.drop()  # and the pooled connections are gone
    yield
    proxy.heal()


@contextlib.contextmanager
def _silent(server, proxy):
    proxy.blackhole(True)
    yield
    proxy.heal()


@contextlib.contextmanager
def _slow(server, proxy):
    proxy.set_latency(0.2)  # well past the 50 ms socket timeout: every call times out
    yield
    proxy.heal()


@contextlib.contextmanager
def _loading(server, proxy):
    with server.loading(1.5):
        yield


FAULTS = {
    "killed": _killed,
    "paused": _paused,
    "refusing": _refusing,
    "silent": _silent,
    "slow": _slow,
    "loading": _loading,
}


def _warm(app):
    for _ in range(3):
        assert app.get(1) == "u1"
        assert app.names() == ["u1", "u2", "u3"]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_reads_and_commits_go_on_while_redis_is_broken(app, fault, fresh_redis, proxy, request, tmp_path):
    _warm(app)
    # Another process, which reaches Redis directly: its entries must not outlive app's commit.
    other = Driver(app.kind, request, tmp_path, fresh_redis.url, app.cache.prefix)
    try:
        for _ in range(3):
            assert other.get(1) == "u1"
        _break_and_recover(app, other, fault, fresh_redis, proxy)
    finally:
        other.close()


def _break_and_recover(app, other, fault, fresh_redis, proxy):
    started = time.monotonic()
    latencies = []
    with FAULTS[fault](fresh_redis, proxy):
        for _ in range(20):
            t = time.monotonic()
            assert app.get(1) == "u1"
            assert app.names() == ["u1", "u2", "u3"]
            latencies.append(time.monotonic() - t)
        app.rename(1, "during")  # the database commits; the eviction is kept for later
        assert app.get(1) == "during"
        assert app.names() == ["during", "u2", "u3"]
        broken = app.cache.stats()
    elapsed = time.monotonic() - started
    assert broken["errors"] > 0
    assert broken["pending_invalidations"] > 0 or fault == "killed"
    # Once Redis answers again, the kept evictions go out before anything is served.
    assert until(app.retry_pending)
    assert app.get(1) == "during" and app.names() == ["during", "u2", "u3"]
    assert other.get(1) == "during"  # delivered to every process
    hits = app.cache.stats()["hits"]
    assert until(lambda: (app.get(1), app.cache.stats()["hits"] > hits)[1], timeout=5)
    assert app.cache.stats()["breaker"] == "closed"
    print(
        f"{app.kind} {fault}: 40 reads in {sum(latencies):.3f}s, worst {max(latencies) * 1000:.0f} ms; "
        f"breaker opened {broken['breaker_opened']}x"
    )
    assert elapsed < 30  # bounded: nothing hangs on a broken Redis


def test_out_of_memory_redis_still_serves_hits_and_delivers_invalidations(
    app, fresh_redis, request, tmp_path
):
    """Under maxmemory with noeviction writes fail but reads and deletes work: hits go on, stores
    fail, and a commit's invalidation gets through by deleting versions instead of bumping them."""
    _warm(app)
    other = Driver(app.kind, request, tmp_path, fresh_redis.url, app.cache.prefix)
    try:
        for _ in range(3):
            assert other.get(1) == "u1"
        fresh_redis.fill_until_oom()
        try:
            hits = app.cache.stats()["hits"]
            for _ in range(5):
                assert app.get(1) == "u1"
                assert app.names() == ["u1", "u2", "u3"]
            assert app.cache.stats()["hits"] >= hits + 10
            assert app.get(3) == "u3"  # a miss: its store fails, counted
            assert app.cache.stats().get("errors.oom", 0) >= 1, app.cache.stats()
            app.rename(1, "during")
            stats = app.cache.stats()
            assert stats["pending_invalidations"] == 0  # delivered, out of memory or not
            assert other.get(1) == "during"  # and seen by the other process at once
            assert app.names() == ["during", "u2", "u3"]  # its store fails: counted, not raised
            assert app.cache.stats()["breaker"] == "closed"
        finally:
            fresh_redis.clear_oom()
        assert until(lambda: (app.names(), app.cache.stats()["hits"] > hits + 10)[1] and True)
    finally:
        other.close()


@pytest.mark.parametrize("kind", DRIVERS)
def test_read_only_replica_reads_from_the_database_and_keeps_invalidations(
    kind, request, tmp_path, fresh_redis, key_prefix
):
    replica = fresh_redis.replica()
    try:
        app = Driver(kind, request, tmp_path, replica.url, key_prefix)
        app.create()
        try:
            for _ in range(3):
                assert app.get(1) == "u1"
            app.rename(1, "during")
            assert app.get(1) == "during"
            stats = app.cache.stats()
            assert stats["errors.readonly"] >= 1
            assert stats["pending_invalidations"] > 0  # kept: nothing is served meanwhile
            assert stats["breaker"] == "closed"  # it answers; it just can't be written
        finally:
            app.close()
    finally:
        replica.stop()


def test_flushed_scripts_are_loaded_again(app, fresh_redis, request, tmp_path):
    _warm(app)
    fresh_redis.script_flush()
    hits = app.cache.stats()["hits"]
    assert app.get(1) == "u1" and app.names() == ["u1", "u2", "u3"]
    assert app.cache.stats()["hits"] == hits + 2
    fresh_redis.script_flush()
    app.rename(1, "after")  # the bump script is loaded again too
    assert app.cache.stats()["pending_invalidations"] == 0
    assert app.get(1) == "after"
    assert app.cache.stats()["errors"] == 0


@pytest.mark.parametrize("kind", DRIVERS)
def test_redis_back_with_older_data_is_detected_and_nothing_stale_is_served(
    kind, request, tmp_path, fresh_redis, key_prefix
):
    """A restart from an old snapshot brings back entries a later commit had invalidated."""
    app = Driver(kind, request, tmp_path, fresh_redis.url, key_prefix)
    app.create()
    try:
        _warm(app)
        restore = fresh_redis.restore_snapshot_later()  # the snapshot holds the u1 entries
        app.rename(1, "after")
        assert app.get(1) == "after" and app.get(1) == "after"  # cached again, newer generation
        restore()  # Redis is back with the entries of before the commit
        assert app.get(1) == "after"
        assert app.names() == ["after", "u2", "u3"]
        assert app.cache.stats()["data_loss"] == 1
    finally:
        app.close()


# ---------------------------------------------------------------------------------------------
# Entries that cannot be served: corrupt, truncated, foreign, oversized.


def _entries(cache):
    backend = cache.backend
    if hasattr(backend, "_entries"):
        return {k: (v.payload, v.deps, v.generation) for k, v in backend._entries.items()}
    client = backend._sync.client
    out = {}
    for raw_key in client.scan_iter(f"{cache.prefix}:e:*"):
        header, _, payload = client.get(raw_key).partition(b"\n")
        fields = header.split(b"\x1f")
        out[raw_key.decode()[len(cache.prefix) + 3 :]] = (
            payload,
            tuple(f.decode() for f in fields[1:]),
            int(fields[0]),
        )
    return out


def _overwrite(cache, transform):
    """Replace every entry's payload, keeping its dependencies valid (so only the payload is bad)."""
    for key, (payload, deps, _) in _entries(cache).items():
        cache.backend.delete([key])
        assert cache.backend.store(key, transform(payload), deps, cache.backend.generation(), 60)


DAMAGE = {
    "truncated": lambda p: p[: len(p) // 2],
    "foreign": lambda p: b"pickle\x80\x04K\x01.",
    "codec-garbage": lambda p: p[:10] + b'[1, [["tests.models.User", {"id": "x"}]], [0]]',
    "empty": lambda p: b"",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entries_are_misses_deleted_counted_and_logged_once(world, damage, caplog):
    seed(world)
    for _ in range(3):
        with world.Session() as s:
            assert s.get(User, 2).name == "u2"
            assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
    _overwrite(world.cache, DAMAGE[damage])
    caplog.clear()
    with caplog.at_level("WARNING", logger="sqlacache"):
        for _ in range(2):
            with world.Session() as s:
                assert s.get(User, 2).name == "u2"
                assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
            _overwrite(world.cache, DAMAGE[damage])
    assert world.cache.stats()["corrupt"] >= 4
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1  # rate-limited
    # Deleted and replaced by good entries: reads are hits again.
    cached(world, lambda s: s.get(User, 2).name)
    cached(world, lambda s: [u.name for u in s.scalars(select(User).order_by(User.id))])


def test_entries_above_max_entry_size_are_not_stored(world):
    seed(world)
    small = world.make_cache(prefix=world.cache.prefix, max_entry_size=300)
    Session = sessionmaker(world.engine, class_=CachingSession, cache=small)
    for _ in range(3):
        with Session() as s:
            assert s.get(User, 1).name == "u1"  # small enough
            assert len(s.scalars(select(User)).all()) == 3  # a few hundred bytes: too large
    stats = small.stats()
    assert stats["too_large"] >= 2 and stats["hits"] >= 1
    # One stored by a process with a larger limit is dropped by this one, not served.
    for _ in range(3):
        with world.Session() as s:
            s.scalars(select(User)).all()
    before = small.stats()["too_large"]
    with Session() as s:
        assert len(s.scalars(select(User)).all()) == 3
    assert small.stats()["too_large"] == before + 2  # dropped on lookup, then too large to store
    small.close()


def test_observability(world, caplog):
    """What a dashboard needs is in stats(); log lines come from sqlacache.* loggers."""
    seed(world)
    cached(world, lambda s: s.get(User, 1).name)
    stats = world.cache.stats()
    for name in ("hits", "misses", "stores", "stores_refused", "invalidations", "errors"):
        assert isinstance(stats[name], int)
    assert stats["pending_invalidations"] == 0
    assert stats["breaker"] == "closed"
    assert stats["hits"] >= 1 and stats["misses"] >= 1 and stats["stores"] >= 1
