"""A Litestar app with advanced-alchemy repositories and services, its reads cached by sqlacache.

Run it with ``litestar --app examples.litestar_app:app run`` (from the repository root), then::

    curl -X POST localhost:8000/authors -H 'content-type: application/json' -d '{"name": "ann", "books": 3}'
    curl localhost:8000/authors/1          # a miss, then hits: no SQL
    curl 'localhost:8000/authors?min_books=2'
    curl 'localhost:8000/authors/count?name=ann'     # count(text("1")): cached too
    curl -X PATCH localhost:8000/authors/1 -H 'content-type: application/json' -d '{"books": 4}'
    curl localhost:8000/stats

Configuration: ``DATABASE_URL`` (default ``sqlite+aiosqlite:///./litestar_example.db``) and
``CACHE_URL`` (default ``memory://``; with several worker processes use Redis, e.g.
``redis://localhost:6379/0``: ``memory://`` is private to each process, so one worker's commit
would not evict what another cached). ``create_app(connection_string=..., cache=...)`` builds one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from advanced_alchemy.extensions.litestar import (
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
    SQLAlchemyPlugin,
    base,
    filters,
    repository,
    service,
)
from litestar import Litestar, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped

from sqlacache import Cache
from sqlacache.litestar import SQLACachePlugin


class Author(base.BigIntBase):
    __tablename__ = "litestar_example_author"
    name: Mapped[str]
    books: Mapped[int]


class AuthorService(service.SQLAlchemyAsyncRepositoryService[Author]):
    class Repo(repository.SQLAlchemyAsyncRepository[Author]):
        model_type = Author

    repository_type = Repo


async def provide_authors(db_session: NamedDependency[AsyncSession]) -> AsyncIterator[AuthorService]:
    async with AuthorService.new(session=db_session) as authors:
        yield authors


def _out(author: Author) -> dict[str, Any]:
    return {"id": author.id, "name": author.name, "books": author.books}


@get("/authors/{author_id:int}")
async def get_author(author_id: FromPath[int], authors: NamedDependency[AuthorService]) -> dict[str, Any]:
    author = await authors.get_one_or_none(id=author_id)  # cached, "not found" included
    if author is None:
        raise NotFoundException("author not found")
    return _out(author)


@get("/authors")
async def list_authors(
    authors: NamedDependency[AuthorService], min_books: FromQuery[int] = 0, limit: FromQuery[int] = 10
) -> dict[str, Any]:
    found, total = await authors.get_many_and_count(
        Author.books >= min_books, filters.OrderBy("id"), filters.LimitOffset(limit=limit, offset=0)
    )
    return {"items": [_out(a) for a in found], "total": total}


@get("/authors/count")
async def count_authors(authors: NamedDependency[AuthorService], name: FromQuery[str]) -> dict[str, Any]:
    # count() and exists() select count(text("1")): cached like any other read.
    return {"count": await authors.count(name=name), "exists": await authors.exists(name=name)}


@post("/authors")
async def create_author(
    data: JSONBody[dict[str, Any]], authors: NamedDependency[AuthorService]
) -> dict[str, Any]:
    return _out(await authors.create(data, auto_commit=True))  # evicts lists and counts of authors


@patch("/authors/{author_id:int}")
async def update_author(
    author_id: FromPath[int], data: JSONBody[dict[str, Any]], authors: NamedDependency[AuthorService]
) -> dict[str, Any]:
    return _out(await authors.update(data, item_id=author_id, auto_commit=True))  # evicts its reads


@delete("/authors/{author_id:int}")
async def delete_author(author_id: FromPath[int], authors: NamedDependency[AuthorService]) -> None:
    await authors.delete(author_id, auto_commit=True)


def create_app(
    connection_string: str | None = None,
    cache: Cache | None = None,
    engine_config: EngineConfig | None = None,
) -> Litestar:
    """The app; defaults come from ``DATABASE_URL`` and ``CACHE_URL``."""
    alchemy = SQLAlchemyAsyncConfig(
        engine_config=engine_config or EngineConfig(),
        connection_string=connection_string
        or os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./litestar_example.db"),
        # Objects stay usable after commit without another (async) load.
        session_config=AsyncSessionConfig(expire_on_commit=False),
        create_all=True,
    )
    cache = cache if cache is not None else Cache(backend=os.environ.get("CACHE_URL", "memory://"))

    @get("/stats")
    async def stats() -> dict[str, Any]:
        return cache.stats()

    return Litestar(
        route_handlers=[
            get_author,
            list_authors,
            count_authors,
            create_author,
            update_author,
            delete_author,
            stats,
        ],
        dependencies={"authors": Provide(provide_authors)},
        # SQLACachePlugin binds the config's engine to the cache at start-up (every session
        # advanced-alchemy makes on it is cached) and closes the cache at shutdown.
        plugins=[SQLAlchemyPlugin(config=alchemy), SQLACachePlugin(cache, alchemy)],
    )


app = create_app()
