"""Sessions that are not plain: mixed with other Session subclasses, routed with ``binds=`` or a
``get_bind()`` override — and Flask-SQLAlchemy's ``db.session``, which is both."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from sqlacache import Cache, CachingAsyncSession, CachingSession
from tests.models import Base, Order, User

flask = pytest.importorskip("flask")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
FlaskSession = flask_sqlalchemy.session.Session

db = flask_sqlalchemy.SQLAlchemy()


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class CachingFirst(CachingSession, FlaskSession):
    """CachingSession.__init__ runs first and must pass Flask's positional ``db`` through."""


class FlaskFirst(FlaskSession, CachingSession):
    """Flask's __init__(db, **kw) runs first and calls super().__init__(**kw)."""


def _app(tmp_path: Any, name: str, **options: Any) -> tuple[Any, Any, list[str]]:
    """A Flask app on its own SQLite file, one Item row; returns (app, db, SQL log)."""
    app = flask.Flask(name)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / (name + '.db')}"
    ext = flask_sqlalchemy.SQLAlchemy(metadata=db.metadata, **options)
    ext.init_app(app)
    sql: list[str] = []
    with app.app_context():
        ext.create_all()
        event.listen(ext.engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
        ext.session.add(Item(id=1, name="first"))
        ext.session.commit()
    return app, ext, sql


def _requests(app: Any, ext: Any, sql: list[str], n: int = 3) -> int:
    """``n`` requests each reading Item 1 and the list of items; returns the SELECTs they sent."""
    before = sum(q.startswith("SELECT") for q in sql)
    for _ in range(n):
        with app.app_context():
            assert ext.session.get(Item, 1).name == ext.session.scalars(select(Item)).one().name
    return sum(q.startswith("SELECT") for q in sql) - before


def _rename(app: Any, ext: Any, name: str) -> None:
    with app.app_context():
        ext.session.get(Item, 1).name = name
        ext.session.commit()


def test_cache_bind_caches_flask_sqlalchemy_db_session_and_commits_evict(tmp_path):
    """``db.session`` has no bind of its own: its get_bind() picks the engine per statement."""
    app, ext, sql = _app(tmp_path, "bound")
    cache = Cache()
    with app.app_context():
        cache.bind(ext.engine)
    try:
        assert _requests(app, ext, sql, 2) > 0  # misses (the first after a cold start isn't stored)
        assert _requests(app, ext, sql) == 0  # served from the cache
        _rename(app, ext, "second")
        with app.app_context():
            assert ext.session.get(Item, 1).name == "second"
            assert ext.session.scalars(select(Item)).one().name == "second"
    finally:
        cache.close()


@pytest.mark.parametrize("session_class", [CachingFirst, FlaskFirst])
def test_caching_session_mixes_with_flask_sqlalchemy_session_in_either_order(tmp_path, session_class):
    cache = Cache()
    app, ext, sql = _app(
        tmp_path, session_class.__name__, session_options={"class_": session_class, "cache": cache}
    )
    with app.app_context():
        assert isinstance(ext.session(), session_class) and ext.session().cache is cache
    _requests(app, ext, sql, 2)
    assert _requests(app, ext, sql) == 0
    _rename(app, ext, "second")
    with app.app_context():
        assert ext.session.get(Item, 1).name == "second"
    with app.app_context():  # Flask's own constructor call, positional db first
        assert session_class(ext, cache=cache).cache is cache
        assert session_class(ext, cache=cache).get(Item, 1).name == "second"


class Audited(Session):
    """A Session subclass whose first positional argument is not the bind."""

    def __init__(self, user: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.user = user


class AuditedCaching(CachingSession, Audited):
    pass


class CachingAudited(Audited, CachingSession):
    pass


@pytest.mark.parametrize("session_class", [AuditedCaching, CachingAudited])
def test_caching_session_passes_positional_arguments_up_the_mro(tmp_path, session_class):
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    with session_class("alice", bind=engine, cache=cache) as s:
        assert s.user == "alice" and s.cache is cache and s.bind is engine
        s.add(User(id=1, name="u1"))
        s.commit()
    sql: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    for _ in range(3):
        with session_class("bob", bind=engine, cache=cache) as s:
            assert s.get(User, 1).name == "u1"
    assert len(sql) == 1  # the first read is stored, the others hit


def test_caching_sessions_still_take_the_bind_positionally(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    cache = Cache()
    with CachingSession(engine, cache=cache) as s:
        assert s.bind is engine
    from sqlalchemy.ext.asyncio import create_async_engine

    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    assert CachingAsyncSession(aengine, cache=cache).bind is aengine


def _two_databases(tmp_path: Any) -> tuple[Any, Any, list[str]]:
    users = create_engine(f"sqlite:///{tmp_path / 'users.db'}")
    orders = create_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    Base.metadata.create_all(users)
    Base.metadata.create_all(orders)
    sql: list[str] = []
    for engine in (users, orders):
        event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    with Session(binds={User: users, Order: orders}) as s:
        s.add_all([User(id=1, name="u1"), Order(id=1, user_id=1, total=5)])
        s.commit()
    return users, orders, sql


def test_plain_session_with_binds_is_cached_for_the_bound_engine_only(tmp_path):
    users, orders, sql = _two_databases(tmp_path)
    cache = Cache()
    cache.bind(users)  # not orders
    try:
        for _ in range(3):
            with Session(binds={User: users, Order: orders}) as s:
                assert s.get(User, 1).name == "u1"
                assert s.get(Order, 1).total == 5
        assert sum("FROM users" in q for q in sql) == 1  # cached by its first miss
        assert sum("FROM orders" in q for q in sql) == 3  # an engine nobody bound: never cached
        with Session(binds={User: users, Order: orders}) as s:
            s.get(User, 1).name = "renamed"
            s.commit()
        with Session(binds={User: users, Order: orders}) as s:
            assert s.get(User, 1).name == "renamed"
    finally:
        cache.close()


def test_plain_session_with_a_get_bind_override_is_cached(tmp_path):
    users, orders, sql = _two_databases(tmp_path)

    class Routing(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return orders if mapper is not None and mapper.class_ is Order else users

    cache = Cache()
    cache.bind(users)
    cache.bind(orders)
    try:
        for _ in range(3):
            with Routing() as s:
                assert s.get(User, 1).name == "u1" and s.get(Order, 1).total == 5
        assert sum("FROM users" in q for q in sql) == 1
        # SQLite is snapshot-isolated: the orders read comes later in a transaction that began
        # before the (cold) cache knew the orders table, so only its second read is stored.
        assert sum("FROM orders" in q for q in sql) == 2
        with Routing() as s:
            s.get(Order, 1).total = 7
            s.commit()
        with Routing() as s:
            assert s.get(Order, 1).total == 7
    finally:
        cache.close()
