"""Drop-in: a caching session behaves exactly like ``Session``, hit or miss, except for the SQL it skips.

Each test here reproduces something an application (or SQLAlchemy's own ORM test suite) noticed.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from sqlalchemy import create_engine, event, exc, select
from sqlalchemy.orm import Session, joinedload, sessionmaker, with_loader_criteria

from sqlacache import Cache, CachingSession
from tests.helpers import cached, seed
from tests.models import Base, Order, User


@pytest.fixture
def sqlite_world(tmp_path):
    """SQLite + memory backend, with SQL recording: the fast world for ORM-behaviour tests."""
    from tests.conftest import World, _record

    engine = create_engine(f"sqlite:///{tmp_path / 'drop_in.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    w = World("sqlite+memory", engine, cache, sessionmaker(engine, class_=CachingSession, cache=cache))
    _record(w, engine)
    seed(w)
    yield w
    cache.close()
    engine.dispose()


# -- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("session_class", [Session, CachingSession])
@pytest.mark.parametrize("load", [True, False])
def test_merge_of_a_new_object_works_in_every_session(sqlite_world, session_class, load):
    """Session.merge() fires the "load" event without a query context; importing sqlacache once
    made that an AttributeError in every session of the process, plain ones too."""
    kw = {"cache": sqlite_world.cache} if session_class is CachingSession else {}
    with session_class(sqlite_world.engine, **kw) as s:
        if load:
            merged = s.merge(User(id=50, name="new"))
        else:
            with session_class(sqlite_world.engine, **kw) as other:
                detached = other.get(User, 1)
            merged = s.merge(detached, load=False)
        assert merged in s
    with session_class(sqlite_world.engine, **kw) as s:
        merged = s.merge(User(id=51, name="m"))
        s.commit()
        assert s.get(User, 51).name == "m"


# -- the result object ---------------------------------------------------------------------------


def _both(world, read):
    """``read`` on a miss, then on a hit (asserting no SQL), each in a fresh session."""
    world.cache.invalidate_all()
    out = []
    for attempt in range(3):
        before = world.statements()
        with world.Session() as s:
            value = read(s)
        if attempt == 0:
            out.append(value)
        elif world.statements() == before:
            out.append(value)
            return out
    raise AssertionError("the read was never served from the cache")


def test_a_joined_eager_collection_demands_unique_on_a_miss_and_on_a_hit(sqlite_world):
    stmt = select(User).options(joinedload(User.orders)).order_by(User.id)
    for _ in range(3):
        with sqlite_world.Session() as s, pytest.raises(exc.InvalidRequestError, match="unique"):
            s.execute(stmt).scalars().all()
    miss, hit = _both(sqlite_world, lambda s: [(u.name, len(u.orders)) for u in s.scalars(stmt).unique()])
    assert miss == hit == [("u1", 2), ("u2", 2), ("u3", 2)]


def test_unique_on_a_multi_entity_select_with_a_joined_eager_collection(sqlite_world):
    stmt = select(User, Order).join(User.orders).options(joinedload(User.orders)).order_by(Order.id)
    read = lambda s: [(u.name, o.id, len(u.orders)) for u, o in s.execute(stmt).unique().all()]
    miss, hit = _both(sqlite_world, read)
    assert miss == hit
    assert len(hit) == 6


def test_a_miss_returns_sqlalchemys_own_result(sqlite_world):
    stmt = select(User).order_by(User.id)
    with Session(sqlite_world.engine) as s:
        plain = s.execute(stmt)
        plain_context = getattr(plain, "context", None)  # SQLAlchemy 2.1's results have one
    with sqlite_world.Session() as s:
        result = s.execute(stmt)
        assert isinstance(result, type(plain))
        assert type(getattr(result, "context", None)) is type(plain_context)
        assert [u.name for u in result.scalars()] == ["u1", "u2", "u3"]


@pytest.mark.parametrize("how", ["close", "expunge_all"])
def test_a_result_consumed_after_the_session_let_go_behaves_as_without_the_cache(tmp_path, how):
    """Whatever plain SQLAlchemy does with a result consumed after close()/expunge_all(), a cache
    miss does the same."""
    engine = create_engine(f"sqlite:///{tmp_path / 'late.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=1, name="a"), User(id=2, name="b")])
        s.commit()

    def outcome(session):
        result = session.execute(select(User).order_by(User.id))
        getattr(session, how)()
        try:
            return [u.name for u in result.scalars()]
        except Exception as e:
            return type(e)

    with Session(engine) as s:
        plain = outcome(s)
    cache = Cache()
    with CachingSession(engine, cache=cache) as s:
        assert outcome(s) == plain  # a miss
    for _ in range(2):  # cache it (the first store of a table is refused)
        with CachingSession(engine, cache=cache) as s:
            s.scalars(select(User).order_by(User.id)).all()
    with CachingSession(engine, cache=cache) as s:
        hits = cache.stats()["hits"]
        assert outcome(s) == plain  # a hit
        assert cache.stats()["hits"] == hits + 1
    cache.close()


def test_tuples_is_honoured_when_the_statement_was_cached_without_it(sqlite_world):
    with sqlite_world.Session() as s:
        assert [u.name for u in s.query(User).order_by(User.id)] == ["u1", "u2", "u3"]
    for _ in range(3):
        with sqlite_world.Session() as s:
            rows = s.query(User).order_by(User.id).only_return_tuples(True).all()
            assert [type(r[0]) for r in rows] == [User] * 3
            rows = s.execute(select(User).order_by(User.id)).all()
            assert [r[0].name for r in rows] == ["u1", "u2", "u3"]


# -- a hit is a load -----------------------------------------------------------------------------


def test_a_hit_begins_the_transaction_like_a_database_read(sqlite_world):
    cached(sqlite_world, lambda s: s.get(User, 1).name)
    cached(sqlite_world, lambda s: s.scalars(select(User).where(User.id == 2)).one().name)
    before = sqlite_world.statements()
    with sqlite_world.Session() as s:
        assert not s.in_transaction()
        s.get(User, 1)
        assert s.in_transaction()
    with sqlite_world.Session() as s:
        s.scalars(select(User).where(User.id == 2)).one()
        assert s.in_transaction()
    assert sqlite_world.statements() == before  # both were hits
    with sqlite_world.Session(autobegin=False) as s:
        with pytest.raises(exc.InvalidRequestError, match="Autobegin is disabled"):
            s.get(User, 1)
        with pytest.raises(exc.InvalidRequestError, match="Autobegin is disabled"):
            s.scalars(select(User).where(User.id == 2)).one()


def test_populate_existing_in_execution_options_refreshes_the_held_object(sqlite_world):
    """As plain SQLAlchemy does (2.1 honours it from execution_options too)."""
    for options in ({"execution_options": {"populate_existing": True}}, {"populate_existing": True}):
        names = []
        for session in (Session(sqlite_world.engine, autoflush=False), sqlite_world.Session(autoflush=False)):
            with session as s:
                user = s.get(User, 1)
                user.name = "changed in memory"
                names.append(s.get(User, 1, **options).name)
        assert names[0] == names[1], options
    assert names == ["u1", "u1"]


def test_user_options_propagate_to_lazy_loads_after_a_hit(sqlite_world):
    """A lazy load on an object served from the cache carries the query's propagating options,
    as it does on one loaded from the database (a shard id, a tenant…)."""
    from sqlalchemy.orm.interfaces import UserDefinedOption

    class Tenant(UserDefinedOption):
        propagate_to_loaders = True

    seen = []

    @event.listens_for(sqlite_world.Session, "do_orm_execute")
    def record(state):
        if state.is_relationship_load:
            seen.append([o.payload for o in state.user_defined_options if isinstance(o, Tenant)])

    stmt = select(User).where(User.id == 1).options(Tenant("acme"))
    cached(sqlite_world, lambda s: s.scalars(stmt).one().name)
    seen.clear()
    sqlite_world.cache.invalidate(Order)  # the lazy load itself must reach the database
    with sqlite_world.Session() as s:
        user = s.scalars(stmt).one()
        assert [o.id for o in user.orders] == [10, 11]
    assert seen == [["acme"]]


# -- hooks that shape statements ---------------------------------------------------------------


def _tenant_sessions(engine, cache, session_class, **kw):
    maker = session_class if kw.get("async_") else sessionmaker
    del kw
    Session = maker(engine, class_=CachingSession, cache=cache) if maker is sessionmaker else None
    return Session


@pytest.mark.parametrize("via", ["get", "select"])
def test_a_tenant_filter_hook_shapes_cached_gets_exactly_like_database_gets(sqlite_world, via):
    """Multi-tenancy through do_orm_execute + with_loader_criteria: one tenant must never be served
    another tenant's row from the cache, by get() or by a select."""
    Session = sqlite_world.Session

    @event.listens_for(Session, "do_orm_execute")
    def tenant_filter(state):
        tenant = state.session.info.get("tenant")
        if state.is_select and tenant is not None:
            state.statement = state.statement.options(
                with_loader_criteria(User, lambda cls: cls.name == tenant, track_closure_variables=True)
            )

    def read(s, pk):
        if via == "get":
            found = s.get(User, pk)
        else:
            found = s.scalars(select(User).where(User.id == pk)).one_or_none()
        return None if found is None else found.name

    hits_before = sqlite_world.cache.stats().get("hits", 0)
    for _ in range(3):
        for tenant in ("u1", "u2"):
            for pk in (1, 2):
                with Session(info={"tenant": tenant}) as s:
                    expected = f"u{pk}" if tenant == f"u{pk}" else None
                    assert read(s, pk) == expected, (tenant, pk)
    assert sqlite_world.cache.stats().get("hits", 0) > hits_before


async def test_a_tenant_filter_hook_shapes_cached_async_gets(tmp_path):
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from sqlacache import CachingAsyncSession

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'tenants.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    cache = Cache()
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache)
    async with Session() as s:
        s.add_all([User(id=1, name="acme"), User(id=2, name="globex")])
        await s.commit()

    @event.listens_for(Session.kw.get("sync_session_class", CachingSession), "do_orm_execute")
    def tenant_filter(state):
        tenant = state.session.info.get("tenant")
        if state.is_select and tenant is not None:
            state.statement = state.statement.options(
                with_loader_criteria(User, lambda cls: cls.name == tenant, track_closure_variables=True)
            )

    try:
        for _ in range(3):
            for tenant in ("acme", "globex"):
                for pk, owner in ((1, "acme"), (2, "globex")):
                    async with Session(info={"tenant": tenant}) as s:
                        found = await s.get(User, pk)
                        assert (found.name if found else None) == (owner if owner == tenant else None)
        assert cache.stats()["hits"] > 0
    finally:
        event.remove(Session.kw.get("sync_session_class", CachingSession), "do_orm_execute", tenant_filter)
        await cache.aclose()
        await engine.dispose()


def test_a_get_bind_override_without_kwargs_works_on_a_miss(sqlite_world):
    """get_bind(self, mapper=None, clause=None), as SQLAlchemy's docs write it."""
    engine = sqlite_world.engine

    class Routing(CachingSession):
        def get_bind(self, mapper=None, clause=None):
            return engine

    Session = sessionmaker(class_=Routing, cache=sqlite_world.cache)
    for _ in range(3):
        with Session() as s:
            assert s.get(User, 1).name == "u1"
            assert [u.name for u in s.scalars(select(User).order_by(User.id))] == ["u1", "u2", "u3"]


def test_autoflush_turned_off_by_a_hook_is_honoured(sqlite_world):
    Session = sqlite_world.Session

    @event.listens_for(Session, "do_orm_execute")
    def no_autoflush(state):
        if state.is_select:
            state.update_execution_options(autoflush=False)

    stmt = select(User).order_by(User.id)
    for _ in range(3):
        with Session() as s:
            s.add(User(id=99, name="pending"))
            assert [u.name for u in s.scalars(stmt)] == ["u1", "u2", "u3"]
            assert len(s.new) == 1  # not flushed by the read


# -- memos hold no session -----------------------------------------------------------------------


def test_no_session_or_object_is_kept_alive_by_the_cache(sqlite_world):
    # A shape no other test runs: the first session to run a shape is the one a memo could keep.
    stmt = select(User).options(joinedload(User.orders)).where(User.id > 0).order_by(User.name.desc())
    refs = []
    for _ in range(3):
        s = sqlite_world.Session()
        users = s.scalars(stmt).unique().all()
        s.get(Order, 10)
        refs.append(weakref.ref(s))
        refs.extend(weakref.ref(u) for u in users)
        del s, users  # dropped without close()
    gc.collect()
    assert [r for r in refs if r() is not None] == []


# -- .cached() -------------------------------------------------------------------------------------


def test_cached_works_on_every_sync_result(world):
    """The README's ``s.execute(stmt).cached(ttl=…)``: on a statement the configuration caches, on
    one it doesn't, on text(), and with the cache disabled."""
    import time

    from sqlalchemy import text

    from sqlacache import ConfigurationError

    seed(world)
    stmt = select(User).where(User.id == 1)
    _, hit = cached(world, lambda s: s.execute(stmt).cached(ttl=60).scalar_one().name)
    assert hit == "u1"
    with world.Session() as s:
        assert s.execute(text("SELECT 1")).cached().all() == [(1,)]
        assert s.execute(select(User.id).where(User.id == 2)).cached().scalars().all() == [2]
        with pytest.raises(ConfigurationError, match="TTL"):
            s.execute(stmt).cached(ttl=-1)
    # The TTL given to .cached() is the one the entry is stored with.
    short = select(User).where(User.id == 3)
    cached(world, lambda s: s.execute(short).cached(ttl=1).scalar_one().name)
    time.sleep(1.2)
    before = world.statements()
    with world.Session() as s:
        assert s.execute(short).cached(ttl=1).scalar_one().name == "u3"
    assert world.statements() > before  # expired: read again
    off = Cache(backend="memory://", enabled=False)
    with CachingSession(world.engine, cache=off) as s:
        assert s.execute(stmt).cached(ttl=60).scalar_one().name == "u1"
    off.close()


def test_a_deferred_select_runs_before_a_later_write_on_the_session_connection(sqlite_world):
    from sqlalchemy import text

    def read_then_write(session):
        result = session.execute(select(User).order_by(User.id))
        session.connection().execute(text("UPDATE users SET name = 'renamed'"))
        names = [u.name for u in result.scalars()]
        session.rollback()
        return names

    with Session(sqlite_world.engine) as s:
        plain = read_then_write(s)
    cache = Cache(models={Order: {"ops": "all"}})  # User is not cached: its selects are deferred
    with CachingSession(sqlite_world.engine, cache=cache) as s:
        assert read_then_write(s) == plain
    cache.close()


def test_without_hooks_of_the_application_get_takes_the_fast_path(sqlite_world):
    """sqlacache's own listeners must not count as the application's do_orm_execute hooks (they
    would send every get() through statement building)."""
    from sqlacache.read.get import reshaped_by_hooks

    with sqlite_world.Session() as s:
        assert not reshaped_by_hooks(s)

    @event.listens_for(sqlite_world.Session, "do_orm_execute")
    def hook(state):
        pass

    with sqlite_world.Session() as s:
        assert reshaped_by_hooks(s)


@pytest.mark.parametrize("option", [{"yield_per": 5}, {"autoflush": False}])
def test_a_statements_load_options_do_not_leak_into_its_relationship_loads(sqlite_world, option):
    """With another do_orm_execute hook installed, yield_per/autoflush given to a statement stay
    with it, as without the cache: its immediateload relationship loads don't inherit them."""
    from sqlalchemy.orm import immediateload

    def outcome(session):
        event.listen(session, "do_orm_execute", lambda state: None)
        session.add(Order(id=99, user_id=1, total=5))
        stmt = select(User).options(immediateload(User.orders)).order_by(User.id)
        try:
            users = session.scalars(stmt.execution_options(**option)).all()
        except exc.InvalidRequestError as e:
            return str(e)
        return [len(u.orders) for u in users], len(session.new)

    with Session(sqlite_world.engine) as s:
        plain = outcome(s)
        s.rollback()
    for _ in range(3):
        with sqlite_world.Session() as s:
            assert outcome(s) == plain
            s.rollback()


def test_a_comparison_to_an_unflushed_object_raises_the_orms_error_and_logs_nothing(sqlite_world, caplog):
    """The ORM can't resolve a bound value from a transient object: the caller gets SQLAlchemy's
    error, as without the cache, and sqlacache doesn't log it as one of its own."""
    stmt = select(Order).where(Order.user == User(name="never flushed"))
    raised = []
    for session in (Session(sqlite_world.engine), sqlite_world.Session()):
        with session as s, pytest.raises(exc.SQLAlchemyError, match="Can't resolve value") as info:
            s.scalars(stmt).all()
        raised.append(type(info.value))
    assert raised[0] is raised[1]
    assert not [r for r in caplog.records if r.name.startswith("sqlacache")]
    assert sqlite_world.cache.stats()["errors"] == 0


@pytest.mark.parametrize("session_class", [Session, CachingSession])
def test_an_abandoned_session_gives_its_connection_back(tmp_path, session_class):
    """A session dropped without close(), mid-transaction, is collected and its connection goes
    back to the pool, as without the cache (nothing of ours may keep the session alive)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'gc.db'}", pool_size=1, max_overflow=0, pool_timeout=1)
    Base.metadata.create_all(engine)
    cache = Cache()
    kw = {"cache": cache} if session_class is CachingSession else {}
    for i in range(3):
        s = session_class(engine, **kw)
        s.add(User(id=i + 1, name="ed"))
        s.flush()
        ref = weakref.ref(s)
        del s
        gc.collect()
        assert ref() is None
    assert engine.pool.checkedout() == 0
    cache.close()
    engine.dispose()


@pytest.mark.parametrize("session_class", [Session, CachingSession])
def test_rollback_recovers_an_invalidated_connection(tmp_path, session_class):
    """After a disconnect, rollback() is how a session recovers: sqlacache's engine listeners must
    not make it raise (for plain sessions too)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'inv.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    kw = {"cache": cache} if session_class is CachingSession else {}
    with session_class(engine, **kw) as s:
        s.scalars(select(User)).all()
        s.connection().invalidate()
        s.rollback()
        assert s.scalars(select(User)).all() == []
    cache.close()
    engine.dispose()


def test_eager_loads_beneath_a_relationship_load_are_there_whichever_statement_ran_it(sqlite_world):
    """selectinload(A).selectinload(B): the load of A, run for one statement and cached, is reused
    under another statement; B must still be loaded (the ORM runs it after A's load, so A's rows
    alone can't carry it). Touching it must emit no SQL (async code would hit MissingGreenlet)."""
    from sqlalchemy.orm import selectinload

    opts = selectinload(Order.user).selectinload(User.tags)
    for stmt in (
        select(Order).where(Order.id == 10).options(opts),
        select(Order).where(Order.total == 0, Order.user_id == 1).options(opts),
    ):
        for _ in range(2):
            with sqlite_world.Session() as s:
                orders = s.scalars(stmt).all()
                before = sqlite_world.statements()
                assert [[t.label for t in o.user.tags] for o in orders] == [["red"]]
                assert sqlite_world.statements() == before
