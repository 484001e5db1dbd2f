"""Invalidation: once commit() returns, no cached read shows the old state."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, exists, func, insert, select, text, update
from sqlalchemy.orm import selectinload, sessionmaker

from tests.helpers import cached, seed
from tests.models import Order, Tag, User, user_tags

# Freshness: also in the near-cache worlds (conftest.py).
pytestmark = [pytest.mark.near_worlds, pytest.mark.cluster_worlds]


def names(s):
    return [u.name for u in s.scalars(select(User).order_by(User.id))]


def active_count(s):
    return s.scalar(select(func.count()).select_from(User).where(User.active))


def test_update_evicts_get_and_lists(world):
    seed(world)
    cached(world, lambda s: s.get(User, 1).name)
    cached(world, names)
    with world.Session() as s:
        s.get(User, 1).name = "changed"
        s.commit()
    with world.Session() as s:
        assert s.get(User, 1).name == "changed"
        assert names(s)[0] == "changed"


def test_row_write_keeps_other_rows_cached(world):
    seed(world)
    cached(world, lambda s: s.get(User, 2).name)
    with world.Session() as s:
        s.get(User, 1, execution_options={"cache": False}).name = "changed"
        s.commit()
    before = world.statements()
    with world.Session() as s:
        assert s.get(User, 2).name == "u2"
    assert world.statements() == before


def test_insert_evicts_lists_counts_and_not_found(world):
    seed(world)
    cached(world, lambda s: s.get(User, 7))
    cached(world, names)
    cached(world, active_count)
    cached(world, lambda s: s.scalar(select(exists().where(User.name == "seven"))))
    with world.Session() as s:
        s.add(User(id=7, name="seven"))
        s.commit()
    with world.Session() as s:
        assert s.get(User, 7).name == "seven"
        assert names(s)[-1] == "seven"
        assert active_count(s) == 4
        assert s.scalar(select(exists().where(User.name == "seven"))) is True


def test_delete_evicts(world):
    seed(world)
    cached(world, lambda s: s.get(User, 3) is not None)
    cached(world, names)
    with world.Session() as s:
        s.delete(s.get(User, 3))
        s.commit()
    with world.Session() as s:
        assert s.get(User, 3) is None
        assert names(s) == ["u1", "u2"]


def test_child_change_evicts_parent_with_eager_children(world):
    seed(world)

    def read(s):
        u = s.scalars(select(User).options(selectinload(User.orders)).where(User.id == 1)).one()
        return [(o.id, o.total) for o in u.orders]

    cached(world, read)
    with world.Session() as s:
        s.get(Order, 10).total = 99
        s.commit()
    with world.Session() as s:
        assert read(s) == [(10, 99), (11, 1)]


def test_many_to_many_change_evicts(world):
    seed(world)

    def read(s):
        return [
            t.label
            for t in s.scalars(select(User).options(selectinload(User.tags)).where(User.id == 1)).one().tags
        ]

    assert cached(world, read)[1] == ["red"]
    with world.Session() as s:
        u = s.get(User, 1)
        u.tags.append(s.get(Tag, 2))
        s.commit()
    with world.Session() as s:
        assert read(s) == ["red", "blue"]


def test_bulk_and_core_writes_evict(world):
    seed(world)
    cached(world, names)
    cached(world, lambda s: s.get(User, 1).name)
    with world.Session() as s:
        s.execute(update(User).where(User.id == 1).values(name="bulk"))
        s.commit()
    with world.Session() as s:
        assert s.get(User, 1).name == "bulk"
        assert names(s)[0] == "bulk"
    cached(world, names)
    with world.Session() as s:
        s.execute(insert(User).values(id=8, name="core"))
        s.execute(delete(User).where(User.id == 2))
        s.commit()
    with world.Session() as s:
        assert names(s) == ["bulk", "u3", "core"]


def test_raw_sql_writes_evict(world):
    seed(world)
    cached(world, names)
    cached(world, lambda s: s.get(User, 3).name)
    with world.Session() as s:
        s.execute(text("UPDATE users SET name = 'raw' WHERE id = 3"))
        s.commit()
    with world.Session() as s:
        assert s.get(User, 3).name == "raw"
        assert names(s)[-1] == "raw"
    cached(world, names)
    with world.Session() as s:
        s.connection().exec_driver_sql("DELETE FROM users WHERE id = 1")
        s.commit()
    with world.Session() as s:
        assert names(s) == ["u2", "raw"]


def test_unparseable_raw_sql_evicts_everything(world, caplog):
    seed(world)
    cached(world, lambda s: [t.label for t in s.scalars(select(Tag))])
    with world.Session() as s:
        if world.dialect == "postgresql":
            s.execute(text("WITH x AS (UPDATE tags SET label = 'green' WHERE id = 1 RETURNING 1) SELECT 1"))
        else:
            s.execute(text("UPDATE tags SET label = 'green' WHERE id = 1"))
        s.commit()
    with world.Session() as s:
        assert "green" in [t.label for t in s.scalars(select(Tag))]


def test_database_cascade_evicts_children(world):
    seed(world)
    cached(world, lambda s: s.scalar(select(func.count()).select_from(Order)))
    with world.Session() as s:
        s.execute(delete(User).where(User.id == 1))
        s.commit()
    with world.Session() as s:
        expected = (
            4
            if world.dialect == "postgresql"
            else s.scalar(select(func.count()).select_from(Order).execution_options(cache=False))
        )
        assert s.scalar(select(func.count()).select_from(Order)) == expected


def test_manual_invalidation(world):
    seed(world)

    # A write nothing in this process sees: another service, psql… (straight through the driver)
    def external(sql):
        raw = world.engine.raw_connection()
        try:
            raw.cursor().execute(sql)
            raw.commit()
        finally:
            raw.close()

    cached(world, lambda s: s.get(User, 1).name)
    cached(world, lambda s: s.get(User, 2).name)
    cached(world, names)
    external("UPDATE users SET name = 'ext' WHERE id IN (1, 2)")
    with world.Session() as s:
        assert s.get(User, 1).name == "u1"  # stale until told: that's what invalidate() is for
    world.cache.invalidate(User, pks=[1])
    with world.Session() as s:
        assert s.get(User, 1).name == "ext"
        assert s.get(User, 2).name == "u2"
        assert names(s)[0] == "ext"
    world.cache.invalidate(User)
    with world.Session() as s:
        assert s.get(User, 2).name == "ext"
    cached(world, lambda s: [t.label for t in s.scalars(select(Tag))])
    external("UPDATE tags SET label = 'x'")
    world.cache.invalidate(tables=["tags"])
    with world.Session() as s:
        assert [t.label for t in s.scalars(select(Tag))] == ["x", "x"]
    cached(world, lambda s: s.get(User, 3).name)
    external("UPDATE users SET name = 'all'")
    world.cache.invalidate_all()
    with world.Session() as s:
        assert s.get(User, 3).name == "all"


def test_association_table_core_write_evicts(world):
    seed(world)

    def read(s):
        return [
            t.label
            for t in s.scalars(select(User).options(selectinload(User.tags)).where(User.id == 2)).one().tags
        ]

    cached(world, read)
    with world.Session() as s:
        s.execute(delete(user_tags).where(user_tags.c.user_id == 2))
        s.commit()
    with world.Session() as s:
        assert read(s) == []


def test_stats_count_what_happened(world):
    seed(world)
    world.cache.reset_stats()
    cached(world, lambda s: s.get(User, 1))
    stats = world.cache.stats()
    if world.near:  # cached() reads a third time there: served from process memory
        assert stats["hits"] == 2
        assert stats["near_hits"] == 1
    else:
        assert stats["hits"] == 1
    assert stats["misses"] == 1
    assert stats["stores"] == 1
    assert stats["errors"] == 0
    with world.Session() as s:
        s.get(User, 1).name = "x"
        s.commit()
    assert world.cache.stats()["invalidations"] == 1


def test_plain_sessions_and_other_caches_on_the_same_database_invalidate_too(world):
    """Admin code with a plain Session, or a second Cache on the same database: their commits must
    evict what the caching sessions cached."""
    from sqlalchemy.orm import Session

    from sqlacache import Cache, CachingSession

    seed(world)
    other_cache = Cache(backend="memory://")
    Other = sessionmaker(world.engine, class_=CachingSession, cache=other_cache)
    cached(world, lambda s: s.get(User, 1).name)
    cached(world, names)
    for _ in range(3):
        with Other() as s:
            s.get(User, 1)
    with Session(world.engine) as plain:
        plain.get(User, 1).name = "by a plain session"
        plain.commit()
    with world.Session() as s:
        assert s.get(User, 1).name == "by a plain session"
        assert names(s)[0] == "by a plain session"
    with Other() as s:
        assert s.get(User, 1).name == "by a plain session"
    with world.Session() as s:
        s.get(User, 1).name = "by the first cache"
        s.commit()
    with Other() as s:
        assert s.get(User, 1).name == "by the first cache"
    with Session(world.engine) as plain:  # bulk/Core writes through a plain session count as well
        plain.execute(update(User).values(active=False))
        plain.commit()
    with world.Session() as s:
        assert s.scalar(select(func.count()).select_from(User).where(User.active)) == 0


def test_invalidate_with_empty_lists_evicts_nothing_and_with_no_arguments_everything(world):
    """``invalidate(tables=[])`` is "these tables changed: none" (e.g. a list computed from a
    query that found nothing); only a call with no arguments at all means invalidate_all."""
    seed(world)
    cached(world, lambda s: s.get(User, 1).name)
    cached(world, names)
    world.cache.reset_stats()
    world.cache.invalidate(tables=[])
    world.cache.invalidate(User, pks=[])
    world.cache.invalidate(User, pks=iter(()), tables=())
    before = world.statements()
    with world.Session() as s:
        assert s.get(User, 1).name == "u1" and names(s)[0] == "u1"
    assert world.statements() == before  # both still served from the cache
    assert world.cache.stats()["invalidations"] == 0
    world.cache.invalidate()
    with world.Session() as s:
        assert s.get(User, 1).name == "u1"
    assert world.statements() == before + 1


def test_invalidate_refuses_a_string_for_tables(world):
    import pytest

    from sqlacache import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"tables='users' is one string; pass a list: \['users'\]"):
        world.cache.invalidate(tables="users")


def test_the_tracker_tells_what_a_commit_is_about_to_evict(world):
    """UnitOfWorkTracker.pending(session): what the transaction has recorded (flushed writes), its
    savepoints included; a rolled back savepoint's writes are dropped; nothing after the commit."""
    from sqlacache import UnitOfWorkTracker

    seed(world)
    with world.Session() as s:
        assert UnitOfWorkTracker.pending(s).deps == frozenset()
        s.get(User, 1).name = "changed"
        assert UnitOfWorkTracker.pending(s).deps == frozenset()  # not flushed yet
        s.flush()
        first = UnitOfWorkTracker.pending(s)
        assert "t:users" in first.deps and any(d.startswith("r:users:") for d in first.deps)
        assert first.tables == {"users"}
        assert [table for table, _values, _guard in first.rows] == ["users", "users"]  # old, new
        savepoint = s.begin_nested()
        s.execute(text("UPDATE orders SET total = 1 WHERE id = -1"))
        assert "t:orders" in UnitOfWorkTracker.pending(s).deps
        savepoint.rollback()
        assert UnitOfWorkTracker.pending(s) == first
        s.commit()
        assert UnitOfWorkTracker.pending(s).deps == frozenset()
    with world.Session() as s:
        assert s.get(User, 1).name == "changed"
