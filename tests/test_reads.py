"""Reads: what a hit returns is what the database path would have returned, without SQL."""

from __future__ import annotations

import pytest
from sqlalchemy import exists, func, inspect, literal_column, select, text
from sqlalchemy.orm import defer, joinedload, load_only, selectinload

from tests.helpers import cached, seed
from tests.models import Order, Status, Tag, User

# Freshness: also in the near-cache worlds (conftest.py).
pytestmark = [pytest.mark.near_worlds, pytest.mark.cluster_worlds]


def snapshot(u: User) -> tuple:
    return (u.id, u.name, u.active, u.status, u.balance, u.joined, u.token)


def test_get_hit_emits_no_sql_and_returns_equal_object(world):
    seed(world)
    db, hit = cached(world, lambda s: snapshot(s.get(User, 2)))
    assert hit == db
    assert isinstance(hit[3], Status)


def test_not_found_is_cached(world):
    seed(world)
    db, hit = cached(world, lambda s: s.get(User, 404))
    assert db is None and hit is None


def test_filtered_list_count_and_exists_are_cached(world):
    seed(world)
    db, hit = cached(
        world, lambda s: [snapshot(u) for u in s.scalars(select(User).where(User.active).order_by(User.id))]
    )
    assert hit == db and len(hit) == 3
    db, hit = cached(world, lambda s: s.scalar(select(func.count()).select_from(User)))
    assert hit == db == 3
    db, hit = cached(world, lambda s: s.scalar(select(exists().where(User.name == "u2"))))
    assert hit is db is True


def test_column_selects_return_rows_like_the_database(world):
    seed(world)

    def read(s):
        result = s.execute(select(User.id, User.name, User.balance).order_by(User.id))
        return (
            list(result.keys()),
            [tuple(r) for r in result],
            [r._asdict() for r in s.execute(select(User.name))],
        )

    db, hit = cached(world, read)
    assert hit == db


def test_objects_from_a_hit_are_attached_editable_and_flushable(world):
    seed(world)
    cached(world, lambda s: s.get(User, 1))
    with world.Session() as s:
        u = s.get(User, 1)
        state = inspect(u)
        assert state.persistent and u in s
        assert s.get(User, 1) is u  # identity map
        assert s.scalars(select(User).where(User.id == 1)).one() is u
        u.name = "renamed"
        s.commit()
    with world.Session() as s:
        assert s.get(User, 1).name == "renamed"
        assert s.get(User, 1, execution_options={"cache": False}).name == "renamed"


def test_object_already_in_session_keeps_its_pending_changes(world):
    seed(world)
    read = lambda s: [u.name for u in s.scalars(select(User).order_by(User.id))]
    cached(world, read)
    with world.Session() as s, s.no_autoflush:
        mine = s.get(User, 1, execution_options={"cache": False})
        mine.name = "pending"
        before = world.statements()
        users = s.scalars(select(User).order_by(User.id)).all()
        assert world.statements() == before  # still a hit
        assert users[0] is mine and mine.name == "pending"
        assert inspect(mine).attrs.name.history.added == ["pending"]


def test_eager_loaded_relationships_are_present_without_sql(world):
    seed(world)

    def read(s):
        users = s.scalars(
            select(User).options(selectinload(User.orders), selectinload(User.tags)).order_by(User.id)
        )
        return [(u.id, [o.id for o in u.orders], [t.label for t in u.tags]) for u in users]

    db, hit = cached(world, read)
    assert hit == db

    def read_joined(s):
        u = s.scalars(select(User).options(joinedload(User.orders)).where(User.id == 2)).unique().one()
        return [(o.id, o.total) for o in u.orders]

    db, hit = cached(world, read_joined)
    assert hit == db == [(20, 0), (21, 1)]


def test_deferred_columns_stay_deferred(world):
    seed(world)
    with world.Session() as s:
        s.get(User, 1).bio = "long text"
        s.commit()
    cached(world, lambda s: s.get(User, 1))
    with world.Session() as s:
        u = s.get(User, 1)
        assert "bio" not in u.__dict__
        before = world.statements()
        assert u.bio == "long text"
        assert world.statements() == before + 1
    cached(world, lambda s: s.scalars(select(User).options(load_only(User.name)).where(User.id == 2)).one())
    with world.Session() as s:
        u = s.scalars(select(User).options(load_only(User.name)).where(User.id == 2)).one()
        assert "active" not in u.__dict__
        assert u.active is True  # loaded on access, like the database path


def test_lazy_load_after_a_hit_still_works(world):
    seed(world)
    cached(world, lambda s: s.get(User, 3))
    with world.Session() as s:
        assert [o.id for o in s.get(User, 3).orders] == [30, 31]


def test_per_call_bypass_and_ttl(world):
    seed(world)
    cached(world, lambda s: s.get(User, 1))
    with world.Session() as s:
        before = world.statements()
        s.get(User, 1, execution_options={"cache": False})
        assert world.statements() == before + 1
    with world.Session() as s:
        s.scalars(select(User).execution_options(cache_ttl=0.05)).all()


@pytest.mark.parametrize(
    "statement",
    [
        select(User).with_for_update(),
        select(User).where(text("id > 0")),
        select(User.id, func.now()),
        select(User.id, func.random()),
        select(User).execution_options(populate_existing=True),
        # "*" stands for whatever columns the table has when the statement runs: no layout to store
        select(literal_column("*")).select_from(User),
    ],
    ids=["for_update", "text", "now", "random", "populate_existing", "star"],
)
def test_never_cached(world, statement):
    if world.dialect == "sqlite" and "for_update" in str(statement.compile()):
        pass
    seed(world)
    for _ in range(3):
        with world.Session() as s:
            before = world.statements()
            s.execute(statement).all()
            assert world.statements() == before + 1


def test_cached_forces_caching_for_unconfigured_models(world):
    from sqlalchemy.orm import sessionmaker

    from sqlacache import Cache, CachingSession

    seed(world)
    cache = Cache(backend=world.cache.backend, prefix=world.cache.prefix, models={User: {"ops": {"get"}}})
    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)
    stmt = select(Order).where(Order.total == 1).order_by(Order.id)
    for _ in range(2):
        with Session() as s:
            s.execute(stmt).cached(ttl=60).scalars().all()
    before = world.statements()
    with Session() as s:
        assert [o.id for o in s.execute(stmt).cached(ttl=60).scalars()] == [11, 21, 31]
        assert world.statements() == before
        # Without .cached(), the same statement goes to the database: Order is not configured.
        s.execute(stmt).scalars().all()
        assert world.statements() == before + 1


def test_legacy_query_is_cached(world):
    seed(world)
    db, hit = cached(world, lambda s: [u.name for u in s.query(User).filter(User.id > 1).order_by(User.id)])
    assert hit == db == ["u2", "u3"]


def test_tags_table_reads(world):
    seed(world)
    db, hit = cached(world, lambda s: [t.label for t in s.scalars(select(Tag).order_by(Tag.id))])
    assert hit == db == ["red", "blue"]


def test_defer_option_then_access(world):
    seed(world)
    cached(world, lambda s: s.scalars(select(User).options(defer(User.name)).where(User.id == 1)).one())
    with world.Session() as s:
        u = s.scalars(select(User).options(defer(User.name)).where(User.id == 1)).one()
        assert u.name == "u1"


def test_lazy_loads_are_cached_per_parent(world):
    seed(world)

    def read(s):
        return [[o.id for o in s.get(User, i).orders] for i in (1, 2, 3)] + [s.get(Order, 20).user.name]

    db, hit = cached(world, read)
    assert hit == db == [[10, 11], [20, 21], [30, 31], "u2"]
    with world.Session() as s:
        s.add(Order(id=12, user_id=1))
        s.commit()
    with world.Session() as s:
        assert read(s)[:2] == [[10, 11, 12], [20, 21]]


def test_results_with_objects_already_in_the_session_are_stored_from_what_was_loaded(world):
    seed(world)
    listing = lambda s: [u.name for u in s.scalars(select(User).order_by(User.id))]
    for _ in range(2):  # the get is cached first, so its object is "known" in the next session
        with world.Session() as s:
            s.get(User, 1)
    with world.Session() as s, s.no_autoflush:
        s.get(User, 1).name = "pending, never flushed"
        listing(s)  # contains the session's own User 1: stored from what it was loaded with
        listing(s)
        s.rollback()
    before = world.statements()
    with world.Session() as s:
        assert listing(s) == ["u1", "u2", "u3"]
    assert world.statements() == before


def test_object_loaded_before_another_commit_is_never_stored_as_current(world):
    seed(world)
    listing = lambda s: [u.name for u in s.scalars(select(User).order_by(User.id))]
    for _ in range(2):
        with world.Session() as s:
            s.get(User, 1)
    with world.Session() as s:
        mine = s.get(User, 1)  # loaded now: "u1" (held: the identity map only keeps referenced objects)
        with world.Session() as other:
            other.get(User, 1, execution_options={"cache": False}).name = "committed meanwhile"
            other.commit()
        # The identity map keeps the object it has (as without a cache): this read shows "u1"…
        assert listing(s)[0] == "u1" == mine.name
    # …but that older view must not have been stored for everyone else.
    with world.Session() as s:
        assert listing(s)[0] == "committed meanwhile"
    with world.Session() as s:
        assert listing(s)[0] == "committed meanwhile"


def test_schema_translate_map_is_part_of_the_key(pg_sync_url, pg_schema, redis_url, key_prefix):
    """Schema-per-tenant: the same statement on two schemas must never share a cache entry."""
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import sessionmaker

    from sqlacache import Cache, CachingSession
    from tests.conftest import _pg_schema_url
    from tests.models import Base

    other = pg_schema + "_b"
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {other}"))
    url, args = _pg_schema_url(pg_sync_url, pg_schema)
    base_engine = create_engine(url, connect_args=args)
    cache = Cache(backend=redis.Redis.from_url(redis_url), prefix=key_prefix)
    try:
        tenants = {}
        for schema, name in ((pg_schema, "in-a"), (other, "in-b")):
            engine = base_engine.execution_options(schema_translate_map={None: schema})
            Base.metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(text(f"DELETE FROM {schema}.user_tags"))
                conn.execute(text(f"DELETE FROM {schema}.orders"))
                conn.execute(text(f"DELETE FROM {schema}.users"))
                conn.execute(User.__table__.insert().values(id=1, name=name))
            tenants[name] = sessionmaker(engine, class_=CachingSession, cache=cache)
        for _ in range(3):
            for name, Session in tenants.items():
                with Session() as s:
                    assert s.get(User, 1).name == name
                    assert s.scalars(select(User)).one().name == name
        assert cache.stats()["hits"] >= 4
    finally:
        cache.invalidate_all()
        cache.close()
        base_engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {other} CASCADE"))
        admin.dispose()


def test_deferred_results_run_before_the_sessions_next_operation(world):
    """execute() of a SELECT the configuration doesn't cache runs when first used — but always
    before the session's next operation, so it sees the state it was issued in."""
    from sqlalchemy.orm import sessionmaker

    from sqlacache import Cache, CachingSession, DeferredResult

    seed(world)
    cache = Cache(backend=world.cache.backend, prefix=world.cache.prefix, models={User: {}})
    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)
    with Session() as s:
        pending = s.execute(select(Order.id).order_by(Order.id))
        assert isinstance(pending, DeferredResult)
        before = world.statements()
        s.add(Order(id=99, user_id=1))
        s.flush()  # the deferred SELECT runs first, then the INSERT
        assert world.sql[before].lstrip().upper().startswith("SELECT")
        rows = pending.scalars().all()
        if world.dialect != "sqlite":  # pysqlite streams rows: a later INSERT can show, as without us
            assert 99 not in rows
        assert 99 in s.scalars(select(Order.id)).all()
        s.rollback()
