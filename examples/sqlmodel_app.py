"""A FastAPI + SQLModel app whose reads go through sqlacache.

Run it with ``uvicorn examples.sqlmodel_app:app`` (from the repository root), then::

    curl -X POST localhost:8000/teams -H 'content-type: application/json' -d '{"name": "red"}'
    curl -X POST localhost:8000/heroes -H 'content-type: application/json' \\
         -d '{"name": "ann", "age": 31, "team_id": 1}'
    curl localhost:8000/heroes/1             # a miss, then hits: no SQL
    curl 'localhost:8000/heroes?min_age=30'
    curl localhost:8000/teams/1              # the team and its heroes (a relationship load, cached)
    curl -X PATCH localhost:8000/heroes/1 -H 'content-type: application/json' -d '{"age": 32}'
    curl localhost:8000/stats

Configuration: ``DATABASE_URL`` (default ``sqlite+aiosqlite:///./sqlmodel_example.db``; e.g.
``postgresql+asyncpg://user@host/db``) and ``CACHE_URL`` (default ``memory://``). With several
workers (``uvicorn --workers 4``, gunicorn) use Redis (``redis://localhost:6379/0``): ``memory://``
is private to each process, so one worker's commit would not evict what another cached.
"""

# No "from __future__ import annotations": SQLModel reads relationship annotations at class creation.
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload
from sqlmodel import Field, Relationship, SQLModel, select

from sqlacache import Cache
from sqlacache.sqlmodel import CachingSQLModelAsyncSession


class Team(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str
    heroes: list["Hero"] = Relationship(back_populates="team")


class HeroBase(SQLModel):
    name: str
    age: int | None = None
    team_id: int | None = Field(default=None, foreign_key="team.id")


class Hero(HeroBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    team: Team | None = Relationship(back_populates="heroes")


class HeroPatch(SQLModel):
    name: str | None = None
    age: int | None = None


class TeamWithHeroes(SQLModel):
    id: int
    name: str
    heroes: list[Hero]


async def get_session(request: Request) -> AsyncIterator[CachingSQLModelAsyncSession]:
    """One caching session per request (FastAPI closes it after the response)."""
    async with request.app.state.Session() as session:
        yield session


SessionDep = Annotated[CachingSQLModelAsyncSession, Depends(get_session)]


def create_app(engine: AsyncEngine | None = None, cache: Cache | None = None) -> FastAPI:
    """The app; ``engine`` and ``cache`` default to ones built from ``DATABASE_URL``/``CACHE_URL``."""
    if engine is None:
        engine = create_async_engine(
            os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./sqlmodel_example.db")
        )
    if cache is None:
        cache = Cache(backend=os.environ.get("CACHE_URL", "memory://"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            # SQLModel's table classes get __table__ at runtime; its stubs don't say so.
            tables = [Team.__table__, Hero.__table__]  # type: ignore[attr-defined]
            await conn.run_sync(lambda c: SQLModel.metadata.create_all(c, tables=tables))
        try:
            yield
        finally:  # after the last request: close the cache, then the engine
            await cache.aclose()
            await engine.dispose()

    app = FastAPI(title="sqlacache + SQLModel example", lifespan=lifespan)
    app.state.cache = cache
    app.state.engine = engine
    # expire_on_commit=False: objects stay usable after commit without another (async) load.
    app.state.Session = async_sessionmaker(
        engine, class_=CachingSQLModelAsyncSession, cache=cache, expire_on_commit=False
    )

    @app.post("/teams", response_model=Team, status_code=201)
    async def create_team(team: Team, session: SessionDep) -> Team:
        session.add(team)
        await session.commit()
        return team

    @app.get("/teams/{team_id}", response_model=TeamWithHeroes)
    async def get_team(team_id: int, session: SessionDep) -> Team:
        stmt = select(Team).where(Team.id == team_id).options(selectinload(Team.heroes))  # type: ignore[arg-type]
        team: Team | None = (await session.exec(stmt)).first()  # the team and its heroes: one cached read
        if team is None:
            raise HTTPException(status_code=404, detail="team not found")
        return team

    @app.post("/heroes", response_model=Hero, status_code=201)
    async def create_hero(hero: HeroBase, session: SessionDep) -> Hero:
        db_hero = Hero.model_validate(hero)
        session.add(db_hero)
        await session.commit()  # evicts cached lists of heroes and the team's heroes
        return db_hero

    @app.get("/heroes/{hero_id}", response_model=Hero)
    async def get_hero(hero_id: int, session: SessionDep) -> Hero:
        hero = await session.get(Hero, hero_id)  # cached, "not found" included
        if hero is None:
            raise HTTPException(status_code=404, detail="hero not found")
        return hero

    @app.get("/heroes", response_model=list[Hero])
    async def list_heroes(session: SessionDep, min_age: int = 0) -> Any:
        stmt = select(Hero).where(Hero.age >= min_age).order_by(Hero.id)  # type: ignore[operator,arg-type,unused-ignore]
        return (await session.exec(stmt)).all()

    @app.patch("/heroes/{hero_id}", response_model=Hero)
    async def update_hero(hero_id: int, patch: HeroPatch, session: SessionDep) -> Hero:
        hero = await session.get(Hero, hero_id)
        if hero is None:
            raise HTTPException(status_code=404, detail="hero not found")
        hero.sqlmodel_update(patch.model_dump(exclude_unset=True))
        await session.commit()  # evicts every cached read of this hero
        return hero

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return cache.stats()

    return app


app = create_app()
