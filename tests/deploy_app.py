"""One model class, ``tests.deploy_app.Item``, as two versions of an application's code map it.

``build("old")`` and ``build("new")`` map the same table; the new code swaps which column each
attribute reads (a rename in both directions: the table's schema is unchanged, only the mapping).
Run as ``python -m tests.deploy_app VERSION TABLE DB_URL REDIS_URL PREFIX`` it is another process
running that code: it reads row 1 through the cache and prints what it read and its cache counters.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from sqlalchemy import Column, Integer, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, sessionmaker

from sqlacache import Cache, CachingSession


def build(version: str, table: str) -> Any:
    """The class ``tests.deploy_app.Item`` as ``version`` of the code maps it (in its own registry)."""

    class Base(DeclarativeBase):
        pass

    first, second = ("a", "b") if version == "old" else ("b", "a")
    columns = [Column("id", Integer, primary_key=True), Column("a", String(20)), Column("b", String(20))]
    t = Table(table, Base.metadata, *columns)
    namespace = {
        "__module__": "tests.deploy_app",  # also when run as __main__
        "__qualname__": "Item",
        "__table__": t,
        "name": t.c[first],
        "nick": t.c[second],
    }
    return type("Item", (Base,), namespace)


def read(Session: Any, Item: Any, cache: Cache | None = None) -> list[Any]:
    """Row 1 by ``get`` and by a statement, each in a session of its own; with ``cache``, whether
    each was a hit too. (A statement is never a hit the first time a process runs it: it can't
    rebuild a result of a shape it has not seen.)"""
    out: list[Any] = []
    hits = cache.stats()["hits"] if cache is not None else 0
    with Session() as s:
        got = s.get(Item, 1)
        out.append([got.name, got.nick])
    if cache is not None:
        out.append(cache.stats()["hits"] > hits)
    with Session() as s:
        row = s.scalars(select(Item).where(Item.id == 1)).one()
        out.append([row.name, row.nick])
    return out


def main(version: str, table: str, db_url: str, redis_url: str, prefix: str) -> None:
    Item = build(version, table)
    engine = create_engine(db_url)
    cache = Cache(backend=redis_url, prefix=prefix)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    got, get_hit, statement = read(Session, Item, cache)
    stats = cache.stats()
    print(
        json.dumps(
            {
                "values": [got, statement],
                "get_hit": get_hit,
                "hits": stats["hits"],
                "corrupt": stats.get("corrupt", 0),
            }
        )
    )
    cache.close()
    engine.dispose()


if __name__ == "__main__":
    main(*sys.argv[1:6])
