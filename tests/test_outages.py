"""Redis down, paused or holding garbage: reads still return correct data and never raise."""

from __future__ import annotations

import time

import redis
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession
from tests.helpers import seed
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


def test_paused_redis_never_serves_what_a_lost_invalidation_would_evict(tmp_path, redis_process):
    w = _world(
        tmp_path, redis.Redis.from_url(redis_process.url, socket_timeout=0.1, socket_connect_timeout=0.1)
    )
    seed(w)
    for _ in range(2):
        with w.Session() as s:
            s.get(User, 1)
    redis_process.pause()
    try:
        with w.Session() as s:
            s.get(User, 1, execution_options={"cache": False}).name = "while-paused"
            s.commit()
        assert w.cache.stats()["pending_invalidations"] > 0
        with w.Session() as s:
            assert s.get(User, 1).name == "while-paused"
    finally:
        redis_process.resume()
    with w.Session() as s:
        assert s.get(User, 1).name == "while-paused"  # pending eviction delivered before serving
    assert w.cache.stats()["pending_invalidations"] == 0
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
    monkeypatch.setattr(w.cache, "submit_store", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    for _ in range(2):
        with w.Session() as s:
            assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]
    assert w.cache.stats()["errors.internal"] == 2


def test_a_bug_while_recording_a_write_evicts_everything_at_commit(tmp_path, monkeypatch):
    from sqlacache import dependencies
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
