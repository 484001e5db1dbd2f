"""Flask-SQLAlchemy: ``sqlacache.flask.init_app`` caches ``db.session`` in the example app under
Flask's test client (SQLite, and PostgreSQL + Redis), every engine of ``SQLALCHEMY_BINDS``
included; ``CachingFlaskSession`` is the ready-made session class; wrong input fails loudly."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.orm import Mapped, mapped_column

from sqlacache import Cache, CachingSession, ConfigurationError

flask = pytest.importorskip("flask")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")

import sqlacache.flask  # noqa: E402
from examples.flask_app import create_app, db  # noqa: E402
from sqlacache.flask import CachingFlaskSession  # noqa: E402


def _record(app: Any) -> list[str]:
    sql: list[str] = []
    with app.app_context():
        for engine in db.engines.values():
            event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: sql.append(stmt))
    return sql


def exercise(app: Any) -> None:
    cache = app.extensions["sqlacache"]
    sql = _record(app)
    client = app.test_client()
    for name, price, shelf in [("pen", 3, "a"), ("ink", 9, "a"), ("pad", 5, None)]:
        r = client.post("/items", json={"name": name, "price": price, "shelf": shelf})
        assert r.status_code == 201, r.text

    def reads() -> Any:
        return client.get("/items/1").get_json(), client.get("/items?max_price=5").get_json()

    first = reads()
    assert first == (
        {"id": 1, "name": "pen", "price": 3, "shelf": "a"},
        [
            {"id": 1, "name": "pen", "price": 3, "shelf": "a"},
            {"id": 3, "name": "pad", "price": 5, "shelf": None},
        ],
    )
    reads()  # a cold cache may refuse its very first stores
    cache.wait_for_stores()
    before, n = cache.stats(), len(sql)
    assert reads() == first
    assert len(sql) == n, sql[n:]  # the get, its relationship load and the list: no SQL
    assert cache.stats()["hits"] > before["hits"]
    assert client.get("/items/99").status_code == 404

    assert client.patch("/items/1", json={"price": 8}).get_json()["price"] == 8
    assert reads() == (
        {"id": 1, "name": "pen", "price": 8, "shelf": "a"},
        [{"id": 3, "name": "pad", "price": 5, "shelf": None}],
    )
    assert client.post("/items", json={"name": "cap", "price": 1, "shelf": None}).status_code == 201
    assert [i["name"] for i in reads()[1]] == ["pad", "cap"]
    assert client.delete("/items/3").status_code == 204
    assert [i["name"] for i in reads()[1]] == ["cap"]
    assert cache.stats()["errors"] == 0


def test_flask_app_on_sqlite(tmp_path):
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'app.db'}"})
    assert isinstance(app.extensions["sqlacache"], Cache)
    try:
        exercise(app)
    finally:
        app.extensions["sqlacache"].close()


@pytest.mark.postgres
@pytest.mark.redis
def test_flask_app_on_postgres_and_redis(pg_sync_url, redis_url, key_prefix):
    schema = f"sqlacache_fl_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        app = create_app(
            {
                "SQLALCHEMY_DATABASE_URI": pg_sync_url,
                "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": f"-csearch_path={schema}"}},
                "SQLACACHE_BACKEND": redis_url,
                "SQLACACHE_OPTIONS": {"prefix": key_prefix},
            }
        )
        cache = app.extensions["sqlacache"]
        assert cache.prefix == key_prefix
        try:
            exercise(app)
        finally:
            cache.invalidate_all()
            cache.close()
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# ---------------------------------------------------------------------------------------------
# Binds, the session class, wrong input.

other = flask_sqlalchemy.SQLAlchemy()


class Note(other.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


class Log(other.Model):  # type: ignore[name-defined,misc]
    __bind_key__ = "logs"
    __tablename__ = "flask_logs"
    id: Mapped[int] = mapped_column(primary_key=True)
    line: Mapped[str]


def _binds_app(tmp_path: Any, **ext: Any) -> tuple[Any, Any]:
    app = flask.Flask(f"binds{uuid.uuid4().hex[:6]}")
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'main.db'}"
    app.config["SQLALCHEMY_BINDS"] = {"logs": f"sqlite:///{tmp_path / 'logs.db'}"}
    db2 = flask_sqlalchemy.SQLAlchemy(metadata=other.metadata, **ext) if ext else other
    db2.metadatas["logs"] = other.metadatas["logs"]  # the models' own, for create_all
    db2.init_app(app)
    with app.app_context():
        db2.create_all()
        db2.session.add_all([Note(id=1, body="n1"), Log(id=1, line="l1")])
        db2.session.commit()
    return app, db2


def _reads_twice_then_hits(app: Any, db2: Any) -> int:
    """Reads a Note and a Log per request; returns the SQL of the third request."""
    sql: list[str] = []
    with app.app_context():
        for engine in db2.engines.values():
            event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: sql.append(stmt))
    for _ in range(3):
        n = len(sql)
        with app.app_context():
            assert db2.session.get(Note, 1).body == "n1"
            assert db2.session.scalars(select(Log)).one().line == "l1"
    return len(sql) - n


def test_init_app_binds_every_engine_of_sqlalchemy_binds(tmp_path):
    app, db2 = _binds_app(tmp_path)
    cache = sqlacache.flask.init_app(app, db2, Cache())
    try:
        assert app.extensions["sqlacache"] is cache
        assert _reads_twice_then_hits(app, db2) == 0  # the default engine's and the "logs" engine's
        with app.app_context():
            db2.session.get(Log, 1).line = "l2"
            db2.session.commit()
        with app.app_context():
            assert db2.session.scalars(select(Log)).one().line == "l2"
    finally:
        cache.close()


def test_caching_flask_session_as_the_session_class(tmp_path):
    cache = Cache()
    app, db2 = _binds_app(tmp_path, session_options={"class_": CachingFlaskSession, "cache": cache})
    try:
        with app.app_context():
            session = db2.session()
            assert isinstance(session, CachingSession) and isinstance(
                session, flask_sqlalchemy.session.Session
            )
            assert session.cache is cache
        assert _reads_twice_then_hits(app, db2) == 0
    finally:
        cache.close()


def test_init_app_refuses_wrong_input(tmp_path):
    app, db2 = _binds_app(tmp_path)
    with pytest.raises(ConfigurationError, match="not a Flask app"):
        sqlacache.flask.init_app(db2, db2)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"not a flask_sqlalchemy\.SQLAlchemy"):
        sqlacache.flask.init_app(app, object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"call db\.init_app\(app\) first"):
        sqlacache.flask.init_app(flask.Flask("bare"), db2)
    with pytest.raises(ConfigurationError, match=r"is not a sqlacache\.Cache"):
        sqlacache.flask.init_app(app, db2, "memory://")  # type: ignore[arg-type]
    app.config["SQLACACHE_OPTIONS"] = "ttl=5"
    with pytest.raises(ConfigurationError, match="give a dict of Cache options"):
        sqlacache.flask.init_app(app, db2)
    app.config["SQLACACHE_OPTIONS"] = {"backend": "memory://"}
    with pytest.raises(ConfigurationError, match="SQLACACHE_BACKEND"):
        sqlacache.flask.init_app(app, db2)
    app.config["SQLACACHE_OPTIONS"] = {"default_ttl": -1}
    with pytest.raises(ConfigurationError, match="TTL"):
        sqlacache.flask.init_app(app, db2)
    # A misspelt option names where it came from (Cache(**options) said only "unexpected keyword").
    app.config["SQLACACHE_OPTIONS"] = {"default_tll": 60}
    with pytest.raises(
        ConfigurationError, match=r"SQLACACHE_OPTIONS'\] has unknown option\(s\) \['default_tll'\]"
    ):
        sqlacache.flask.init_app(app, db2)
    # A misspelt key would have left the cache in process memory, silently.
    app.config["SQLACACHE_OPTIONS"] = {}
    app.config["SQLACACHE_BACKEN"] = "redis://localhost:6379/0"
    with pytest.raises(ConfigurationError, match=r"\['SQLACACHE_BACKEN'\]: sqlacache reads only"):
        sqlacache.flask.init_app(app, db2)
    # Twice on one app: the second cache would take the engines over and leave the first open.
    del app.config["SQLACACHE_BACKEN"]
    cache = sqlacache.flask.init_app(app, db2)
    with pytest.raises(ConfigurationError, match="already set up on this app"):
        sqlacache.flask.init_app(app, db2)
    assert app.extensions["sqlacache"] is cache
    cache.close()
