"""Litestar + advanced-alchemy: the example app's repositories and services read through the cache
(``get``, filtered ``get_many_and_count``, ``count``/``exists`` with their ``count(text("1"))``) and
read their own writes after every create, update and delete — on SQLite and PostgreSQL + Redis."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

from sqlacache import Cache, ConfigurationError

pytest.importorskip("litestar")
pytest.importorskip("advanced_alchemy")
from advanced_alchemy.extensions.litestar import (
    EngineConfig,
    SQLAlchemyAsyncConfig,
    SQLAlchemyPlugin,
    SQLAlchemySyncConfig,
    SyncSessionConfig,
    repository,
)
from litestar import Litestar, get
from litestar.di import NamedDependency
from litestar.testing import AsyncTestClient, TestClient
from sqlalchemy.orm import Session

from examples.litestar_app import Author, create_app
from sqlacache.litestar import SQLACachePlugin


async def exercise(app: Any) -> None:
    plugin = app.plugins.get(SQLACachePlugin)
    cache = plugin.cache
    sql: list[str] = []
    async with AsyncTestClient(app=app) as client:
        engine = plugin.configs[0].get_engine()
        assert app.state.sqlacache is cache
        event.listen(engine.sync_engine, "before_cursor_execute", lambda c, cur, stmt, *a: sql.append(stmt))

        async def reads() -> Any:
            one = await client.get("/authors/1")
            listing = (await client.get("/authors", params={"min_books": 2})).json()
            counted = (await client.get("/authors/count", params={"name": "ann"})).json()
            return one.status_code, one.json(), listing, counted

        for name, books in [("ann", 3), ("bob", 1), ("cy", 5)]:
            r = await client.post("/authors", json={"name": name, "books": books})
            assert r.status_code == 201, r.text
        first = await reads()
        assert first == (
            200,
            {"id": 1, "name": "ann", "books": 3},
            {
                "items": [{"id": 1, "name": "ann", "books": 3}, {"id": 3, "name": "cy", "books": 5}],
                "total": 2,
            },
            {"count": 1, "exists": True},
        )
        await reads()  # a cold cache may refuse its very first stores
        await cache.await_for_stores()
        before, n = cache.stats(), len(sql)
        assert await reads() == first
        after = cache.stats()
        assert len(sql) == n, sql[n:]  # get, get_many_and_count, count and exists: all hits, no SQL
        assert after["hits"] == before["hits"] + 4 and after["misses"] == before["misses"]

        assert (await client.get("/authors/99")).status_code == 404
        assert (await client.get("/authors/count", params={"name": "zed"})).json() == {
            "count": 0,
            "exists": False,
        }

        r = await client.patch("/authors/1", json={"books": 0})  # update: fresh at once
        assert r.status_code == 200 and r.json()["books"] == 0
        assert await reads() == (
            200,
            {"id": 1, "name": "ann", "books": 0},
            {"items": [{"id": 3, "name": "cy", "books": 5}], "total": 1},
            {"count": 1, "exists": True},
        )
        r = await client.post("/authors", json={"name": "ann", "books": 7})  # create
        assert r.status_code == 201
        status, _, listing, counted = await reads()
        assert [a["books"] for a in listing["items"]] == [5, 7] and counted == {"count": 2, "exists": True}
        assert (await client.delete("/authors/1")).status_code == 204  # delete
        status, _, listing, counted = await reads()
        assert status == 404 and counted == {"count": 1, "exists": True} and listing["total"] == 2
        assert (await client.delete(f"/authors/{r.json()['id']}")).status_code == 204
        assert (await client.get("/authors/count", params={"name": "ann"})).json() == {
            "count": 0,
            "exists": False,
        }
        assert cache.stats()["errors"] == 0
        await cache.ainvalidate_all()  # leave nothing behind in a shared Redis
    assert cache.closed  # the plugin closed it at shutdown


async def test_litestar_app_on_sqlite(tmp_path):
    await exercise(create_app(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", Cache()))


@pytest.mark.postgres
@pytest.mark.redis
async def test_litestar_app_on_postgres_and_redis(pg_sync_url, pg_async_url, redis_url, key_prefix):
    schema = f"sqlacache_ls_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        app = create_app(
            pg_async_url,
            Cache(backend=redis_url, prefix=key_prefix),
            EngineConfig(connect_args={"server_settings": {"search_path": schema}}),
        )
        await exercise(app)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def test_plugin_rejects_what_it_cannot_use():
    config = SQLAlchemyAsyncConfig(connection_string="sqlite+aiosqlite://")
    with pytest.raises(ConfigurationError, match=r"not a sqlacache\.Cache"):
        SQLACachePlugin("memory://", config)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="name the advanced-alchemy config"):
        SQLACachePlugin(Cache())
    with pytest.raises(ConfigurationError, match="has no get_engine"):
        SQLACachePlugin(Cache(), "sqlite+aiosqlite://")
    # The arguments swapped: the message names the config's type, not its pages-long repr.
    with pytest.raises(ConfigurationError) as raised:
        SQLACachePlugin(config, Cache())  # type: ignore[arg-type]
    assert str(raised.value).startswith("SQLACachePlugin: a SQLAlchemyAsyncConfig is not a sqlacache.Cache")
    assert len(str(raised.value)) < 200


def test_plugin_caches_a_sync_config_too(tmp_path):
    class Authors(repository.SQLAlchemySyncRepository[Author]):
        model_type = Author

    @get("/count", sync_to_thread=True)
    def count(db_session: NamedDependency[Session]) -> dict[str, int]:
        return {"count": Authors(session=db_session).count(name="ann")}

    alchemy = SQLAlchemySyncConfig(
        connection_string=f"sqlite:///{tmp_path / 'sync.db'}",
        session_config=SyncSessionConfig(expire_on_commit=False),
        create_all=True,
    )
    cache = Cache()
    app = Litestar(
        route_handlers=[count], plugins=[SQLAlchemyPlugin(config=alchemy), SQLACachePlugin(cache, alchemy)]
    )
    sql: list[str] = []
    with TestClient(app=app) as client:
        with alchemy.get_session() as session:
            Authors(session=session).add(Author(name="ann", books=1), auto_commit=True)
        event.listen(alchemy.get_engine(), "before_cursor_execute", lambda c, cur, stmt, *a: sql.append(stmt))
        assert client.get("/count").json() == {"count": 1}
        n = len(sql)
        assert client.get("/count").json() == {"count": 1}
        assert len(sql) == n, sql[n:]
        with alchemy.get_session() as session:
            Authors(session=session).add(Author(name="ann", books=2), auto_commit=True)
        assert client.get("/count").json() == {"count": 2}
    assert cache.closed
