"""The examples run and show what they claim: the quickstart script and the FastAPI app."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqlacache import Cache

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_and_shows_hits_and_eviction():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    gets = [line for line in lines if line.startswith("get User 1")]
    assert any("HIT  (0 SQL statements) -> 'alice'" in line for line in gets), proc.stdout
    assert any(
        re.search(r"alice \+ orders .*HIT  \(0 SQL statements\) -> \[25, 40\]", line) for line in lines
    )
    rename = next(i for i, line in enumerate(lines) if line.startswith("rename User 1 + commit"))
    after = [line for line in lines[rename + 1 :] if line.startswith("get User 1")]
    assert "MISS" in after[0] and after[0].endswith("-> 'alicia'"), proc.stdout
    assert "HIT  (0 SQL statements) -> 'alicia'" in after[1], proc.stdout
    assert "'alice'" not in "\n".join(lines[rename + 1 :])
    assert lines[-1].startswith("cache.stats(): {'hits': ")


# ---------------------------------------------------------------------------------------------
# The FastAPI app, driven in process through its ASGI interface, lifespan included.


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def exercise(app: Any, sql: list[str], shared_backend: bool = False) -> None:
    async def stats() -> dict[str, Any]:
        return (await client.get("/stats")).json()

    async with running(app) as client:
        for name, active in [("alice", True), ("bob", True), ("carol", False)]:
            r = await client.post("/users", json={"name": name, "active": active})
            assert r.status_code == 201, r.text
        ids = {r["name"]: r["id"] for r in (await client.get("/users")).json()}
        alice = ids["alice"]

        # A cold cache may refuse the first store (a dependency's version is created then), so
        # warm up with up to two reads; from then on the read is a hit with no SQL.
        first = (await client.get(f"/users/{alice}")).json()
        assert first == {"id": alice, "name": "alice", "active": True}
        if (await stats())["stores"] == 0:
            await client.get(f"/users/{alice}")
        before, n = await stats(), len(sql)
        r = await client.get(f"/users/{alice}")
        assert r.json() == first
        after = await stats()
        assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
        assert len(sql) == n, sql[n:]

        assert (await client.get("/users/999999")).status_code == 404
        assert (await client.get("/users/999999")).status_code == 404

        listing = (await client.get("/users", params={"active": "true"})).json()
        assert [u["name"] for u in listing] == ["alice", "bob"]
        before, n = await stats(), len(sql)
        assert (await client.get("/users", params={"active": "true"})).json() == listing
        assert (await stats())["hits"] == before["hits"] + 1 and len(sql) == n

        r = await client.patch(f"/users/{alice}", json={"name": "alicia"})
        assert r.status_code == 200 and r.json()["name"] == "alicia"
        assert (await client.patch("/users/999999", json={"name": "x"})).status_code == 404
        assert (await client.get(f"/users/{alice}")).json()["name"] == "alicia"
        names = [u["name"] for u in (await client.get("/users", params={"active": "true"})).json()]
        assert names == ["alicia", "bob"]
        assert [u["name"] for u in (await client.get("/users", params={"active": "false"})).json()] == [
            "carol"
        ]

        final = await stats()
        assert final["errors"] == 0 and final["invalidations"] >= 4
        if shared_backend:
            await app.state.cache.ainvalidate_all()  # leave nothing behind in a shared Redis


def record(engine: Any) -> list[str]:
    sql: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda conn, cur, stmt, *rest: sql.append(stmt))
    return sql


async def test_fastapi_app_on_sqlite(tmp_path, monkeypatch):
    from examples.fastapi_app import create_app

    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    monkeypatch.setenv("CACHE_URL", "memory://")
    app = create_app()
    await exercise(app, record(app.state.engine))
    assert (tmp_path / "app.db").exists()


@pytest.mark.postgres
@pytest.mark.redis
async def test_fastapi_app_on_postgres_and_redis(pg_async_url, redis_url):
    from examples.fastapi_app import create_app

    schema = f"sqlacache_example_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(pg_async_url)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        engine = create_async_engine(pg_async_url, connect_args={"server_settings": {"search_path": schema}})
        cache = Cache(backend=redis_url, prefix=f"sqlacache-test-{uuid.uuid4().hex[:12]}")
        app = create_app(engine=engine, cache=cache)
        await exercise(app, record(engine), shared_backend=True)
    finally:
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()
