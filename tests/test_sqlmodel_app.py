"""The FastAPI + SQLModel example: hits with no SQL, fresh after every write, lifespan included —
on SQLite (aiosqlite + memory://) and PostgreSQL (asyncpg) + Redis."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqlacache import Cache
from tests.test_examples import running

pytest.importorskip("sqlmodel")
pytest.importorskip("fastapi")


async def exercise(app: Any) -> None:
    cache = app.state.cache
    sql: list[str] = []
    event.listen(app.state.engine.sync_engine, "before_cursor_execute", lambda c, cur, s, *a: sql.append(s))
    async with running(app) as client:
        for name in ("red", "blue"):
            assert (await client.post("/teams", json={"name": name})).status_code == 201
        for name, age, team in [("ann", 31, 1), ("bob", 25, 1), ("cy", 40, 2)]:
            r = await client.post("/heroes", json={"name": name, "age": age, "team_id": team})
            assert r.status_code == 201, r.text

        async def reads() -> Any:
            hero = (await client.get("/heroes/1")).json()
            older = [h["name"] for h in (await client.get("/heroes", params={"min_age": 30})).json()]
            team = (await client.get("/teams/1")).json()
            return hero, older, team["name"], sorted(h["name"] for h in team["heroes"])

        first = await reads()
        assert first == (
            {"id": 1, "name": "ann", "age": 31, "team_id": 1},
            ["ann", "cy"],
            "red",
            ["ann", "bob"],
        )
        await reads()  # a cold cache may refuse its very first stores
        await cache.await_for_stores()
        before, n = cache.stats(), len(sql)
        assert await reads() == first
        assert len(sql) == n, sql[n:]  # exec(), get() and the selectin-loaded heroes: all hits
        assert cache.stats()["hits"] > before["hits"]
        assert (await client.get("/heroes/99")).status_code == 404

        r = await client.patch("/heroes/1", json={"age": 29})
        assert r.status_code == 200 and r.json()["age"] == 29
        assert await reads() == (
            {"id": 1, "name": "ann", "age": 29, "team_id": 1},
            ["cy"],
            "red",
            ["ann", "bob"],
        )
        assert (
            await client.post("/heroes", json={"name": "dee", "age": 50, "team_id": 1})
        ).status_code == 201
        assert (await reads())[1:] == (["cy", "dee"], "red", ["ann", "bob", "dee"])
        assert cache.stats()["errors"] == 0
        await cache.ainvalidate_all()  # leave nothing behind in a shared Redis
    assert cache.closed  # the lifespan closed it


async def test_sqlmodel_app_on_sqlite(tmp_path, monkeypatch):
    from examples.sqlmodel_app import create_app

    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    monkeypatch.setenv("CACHE_URL", "memory://")
    await exercise(create_app())


@pytest.mark.postgres
@pytest.mark.redis
async def test_sqlmodel_app_on_postgres_and_redis(pg_async_url, redis_url, key_prefix):
    from examples.sqlmodel_app import create_app

    schema = f"sqlacache_smapp_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(pg_async_url)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        engine = create_async_engine(pg_async_url, connect_args={"server_settings": {"search_path": schema}})
        await exercise(create_app(engine=engine, cache=Cache(backend=redis_url, prefix=key_prefix)))
    finally:
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()
