"""A small FastAPI app whose reads go through sqlacache.

Run it with ``uvicorn examples.fastapi_app:app`` (from the repository root), then::

    curl -X POST localhost:8000/users -H 'content-type: application/json' -d '{"name": "alice"}'
    curl localhost:8000/users/1           # a miss: read from the database and stored
    curl localhost:8000/users/1           # a hit: no SQL (a cold cache may take one more miss)
    curl 'localhost:8000/users?active=true'
    curl -X PATCH localhost:8000/users/1 -H 'content-type: application/json' -d '{"name": "alicia"}'
    curl localhost:8000/users/1           # the commit evicted the old entry: the new name
    curl localhost:8000/stats

Configuration: ``DATABASE_URL`` (default ``sqlite+aiosqlite:///./example.db``; e.g.
``postgresql+asyncpg://user@host/db``) and ``CACHE_URL`` (default ``memory://``; e.g.
``redis://localhost:6379/0``). ``create_app(engine=..., cache=...)`` builds an app on your own.

What it shows: the lifespan creates the tables and, at shutdown, closes the cache and then the
engine; ``get_session`` is the dependency that yields one caching session per request.

Several workers (``uvicorn --workers 4``, gunicorn with uvicorn workers): use Redis
(``CACHE_URL=redis://…``). ``memory://`` is private to each process: one worker's commit would
evict nothing from another worker's memory, which would keep serving the old rows until their TTL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlacache import Cache, CachingAsyncSession


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(default=True)


class UserIn(BaseModel):
    name: str
    active: bool = True


class UserPatch(BaseModel):
    name: str


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    active: bool


async def get_session(request: Request) -> AsyncIterator[CachingAsyncSession]:
    """One caching session per request; FastAPI closes it once the response is sent."""
    async with request.app.state.Session() as session:
        yield session


SessionDep = Annotated[CachingAsyncSession, Depends(get_session)]


def create_app(engine: AsyncEngine | None = None, cache: Cache | None = None) -> FastAPI:
    """The app; ``engine`` and ``cache`` default to ones built from ``DATABASE_URL``/``CACHE_URL``."""
    if engine is None:
        engine = create_async_engine(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./example.db"))
    if cache is None:
        cache = Cache(backend=os.environ.get("CACHE_URL", "memory://"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        try:
            yield
        finally:  # after the last request: close the cache (its pending stores land), then the engine
            await cache.aclose()
            await engine.dispose()

    app = FastAPI(title="sqlacache example", lifespan=lifespan)
    app.state.cache = cache
    app.state.engine = engine
    # expire_on_commit=False: objects stay usable after commit without another (async) load.
    app.state.Session = async_sessionmaker(
        engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False
    )

    @app.get("/users/{user_id}", response_model=UserOut)
    async def get_user(user_id: int, session: SessionDep) -> User:
        user = await session.get(User, user_id)  # cached, "not found" included
        if user is None:
            raise HTTPException(status_code=404, detail="user not found")
        return user

    @app.get("/users", response_model=list[UserOut])
    async def list_users(session: SessionDep, active: bool | None = None) -> list[User]:
        stmt = select(User).order_by(User.id)
        if active is not None:
            stmt = stmt.where(User.active == active)
        return list((await session.scalars(stmt)).all())

    @app.post("/users", response_model=UserOut, status_code=201)
    async def create_user(body: UserIn, session: SessionDep) -> User:
        user = User(name=body.name, active=body.active)
        session.add(user)
        await session.commit()  # evicts cached lists and counts of users
        return user

    @app.patch("/users/{user_id}", response_model=UserOut)
    async def rename_user(user_id: int, body: UserPatch, session: SessionDep) -> User:
        user = await session.get(User, user_id)
        if user is None:
            raise HTTPException(status_code=404, detail="user not found")
        user.name = body.name
        await session.commit()  # evicts every cached read of this user
        return user

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return cache.stats()

    return app


app = create_app()
