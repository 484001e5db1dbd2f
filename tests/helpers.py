"""Small helpers shared by the behaviour tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm.util import AliasedClass
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.schema import Column, Table

from tests.models import Order, Tag, User


def wal(sync_engine: Any) -> None:
    """WAL lets a reader hold a result open while a writer commits, as on a server database."""

    @event.listens_for(sync_engine, "connect")
    def _(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()


def _world_objects(n: int) -> list[Any]:
    tags = [Tag(id=1, label="red"), Tag(id=2, label="blue")]
    return [
        User(id=i, name=f"u{i}", orders=[Order(id=i * 10 + j, total=j) for j in range(2)], tags=tags[: i % 3])
        for i in range(1, n + 1)
    ]


def seed(world: Any, n: int = 3) -> None:
    with world.Session() as s:
        s.add_all(_world_objects(n))
        s.commit()


async def aseed(world: Any, n: int = 3) -> None:
    async with world.Session() as s:
        s.add_all(_world_objects(n))
        await s.commit()


def near_settled(cache: Any, timeout: float = 10.0) -> None:
    """Wait until ``cache``'s near-cache (if it has one) is in step with every bump made so far, so
    that what a read fetches from the backend now is taken into process memory (an eviction that
    arrives after the read began may refuse it)."""
    near = cache.near
    if near is None:
        return
    subscription = near.subscription
    position = cache.backend.position()
    assert until(lambda: near.in_step and subscription.caught_up(position), timeout), (
        f"the near-cache did not catch up with {position}: {subscription.position}"
    )


def _same(a: Any, b: Any) -> bool:
    """Equal values; mapped objects (equal only to themselves) by their loaded column values."""
    state = inspect(a, raiseerr=False)
    if state is not None and hasattr(state, "mapper"):
        columns = [p.key for p in state.mapper.column_attrs]
        loaded = lambda o: {k: v for k, v in vars(o).items() if k in columns}
        return type(a) is type(b) and loaded(a) == loaded(b)
    return bool(a == b)


def _near_hits(world: Any) -> int:
    return int(world.cache.stats().get("near_hits", 0))


def cached(world: Any, read: Callable[[Any], Any]) -> Any:
    """Run ``read`` in a fresh session (a miss, which stores it), then again: it must be served from
    the cache, with no SQL, even on a cold cache (every first read is stored). Returns
    (db_value, hit_value).

    In a near world (``world.near``) the read runs a third time: the backend's answer to the second
    was taken into process memory, and the third must be served from there (a near hit, no SQL,
    the same value), so that what the test does next finds it in memory."""
    with world.Session() as s:
        first = read(s)
    world.cache.wait_for_stores()
    near_settled(world.cache)
    before = world.statements()
    with world.Session() as s:
        hit = read(s)
        assert world.statements() == before, f"expected a cache hit, got SQL: {world.sql[before:]}"
    if getattr(world, "near", False):
        near_hits = _near_hits(world)
        with world.Session() as s:
            again = read(s)
            assert world.statements() == before, f"expected a near hit, got SQL: {world.sql[before:]}"
        assert _same(again, hit)
        assert _near_hits(world) > near_hits, "the third read was not served from process memory"
    return first, hit


async def acached(world: Any, read: Callable[[Any], Any]) -> Any:
    async with world.Session() as s:
        first = await read(s)
    await world.cache.await_for_stores()
    near_settled(world.cache)
    before = world.statements()
    async with world.Session() as s:
        hit = await read(s)
        assert world.statements() == before, f"expected a cache hit, got SQL: {world.sql[before:]}"
    if getattr(world, "near", False):
        near_hits = _near_hits(world)
        async with world.Session() as s:
            again = await read(s)
            assert world.statements() == before, f"expected a near hit, got SQL: {world.sql[before:]}"
        assert _same(again, hit)
        assert _near_hits(world) > near_hits, "the third read was not served from process memory"
    return first, hit


def until(condition: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it is true; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _filter_signature(f: Any) -> Any:
    """A uniquing function of a result's metadata, as a comparable value (without calling a stateful one)."""
    if f is None or f is id:
        return f
    cells = dict(zip(f.__code__.co_freevars, [c.cell_contents for c in f.__closure__ or ()]))
    if "datatype" not in cells:  # legacy uniquing of values that may not hash: hash(), else id()
        return ("hash or id", *cells.values())
    try:  # raises the ORM's error for a value that does not hash (stateless: safe to call)
        f([])
    except Exception as exc:
        return ("raise", repr(cells["datatype"]), cells["uncertain"], type(exc), str(exc))
    return ("no raise", repr(cells["datatype"]), cells["uncertain"])


def _lookup_key(key: Any) -> Any:
    """A key of a result's keymap, comparable across two equal statements (a process may have compiled
    either first, and a result's keys hold the objects of the one compiled first): objects of the
    schema and the mappings compare by identity, the expressions each statement makes anew (labels,
    ``exists()``, aliases and their columns, the labels a compiler makes) by what they render."""
    if type(key).__name__ == "_CompileLabel":
        return ("_CompileLabel", _lookup_key(key.element))
    if isinstance(key, AliasedClass):
        return ("AliasedClass", inspect(key).mapper.class_, inspect(key).name)
    if isinstance(key, ClauseElement) and not (isinstance(key, Column) and isinstance(key.table, Table)):
        try:
            return (type(key).__name__, str(key))
        except Exception:
            return (type(key).__name__,)
    return (type(key).__name__, hash(key))


def template_signature(template: Any) -> dict[str, Any]:
    """Everything a ResultTemplate decides about a result, comparable across two templates."""
    md = template.metadata
    create = getattr(md, "_create_unique_filters", None)
    filters = create(None) if create is not None else getattr(md, "_unique_filters", None)
    return {
        "keys": list(md._keys),
        # (a set: one statement's expression and an equal statement's are one key here)
        "keymap": {
            (_lookup_key(k), v[0], v[1], frozenset(_lookup_key(x) for x in v[2]))
            for k, v in md._keymap.items()
        },
        "ambiguous": md._ambiguous_keys,
        "filters": [_filter_signature(f) for f in filters or ()],
        "single_entity": template.single_entity,
        "attributes": dict(template.attributes),
        "requires_unique": template.requires_unique,
    }
