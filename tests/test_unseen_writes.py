"""Writes the cache does not see through a session, and entries built by other code.

Each test stores an entry, then changes the truth in a way no CachingSession flush records — DML on
an engine ``Connection``, DDL, TRUNCATE, another mapping of the same class — and asserts that the
next read returns the database's new truth, not the old entry.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, create_engine, delete, event, insert, select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession
from sqlacache.analysis.dependencies import written_tables
from sqlacache.pg_notify import install_triggers
from tests import deploy_app
from tests.conftest import _pg_schema_url
from tests.helpers import until, wal

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Probe:
    """An engine, a cache on it and a session factory, counting the statements sent."""

    def __init__(self, engine: Any, cache: Cache) -> None:
        self.engine = engine
        self.cache = cache
        self.Session = sessionmaker(engine, class_=CachingSession, cache=cache)
        self.sql: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: self.sql.append(stmt))

    def cached(self, read: Any) -> Any:
        """Run ``read`` in fresh sessions until it is a hit; return its value."""
        for _ in range(3):
            before = len(self.sql)
            with self.Session() as s:
                value = read(s)
            if len(self.sql) == before:
                return value
        raise AssertionError("the read was never served from the cache")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "unseen_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))


class Child(Base):
    __tablename__ = "unseen_children"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("unseen_items.id"))


items, children = Item.__table__, Child.__table__


def name_of(s: Any, pk: int = 1) -> str | None:
    found = s.get(Item, pk)
    return None if found is None else str(found.name)


def names(s: Any) -> list[str]:
    return list(s.scalars(select(Item.name).order_by(Item.id)).all())


def child_ids(s: Any) -> list[int]:
    return list(s.scalars(select(Child.id).order_by(Child.id)).all())


def _fill(engine: Any) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(items), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        conn.execute(insert(children), [{"id": 10, "item_id": 1}])


class World:
    """The application's cached sessions, and another engine of the same database for the writes
    they don't see (a migration tool, a test fixture, a Core job)."""

    def __init__(self, dialect: str, probe: Probe, writer: Any) -> None:
        self.dialect = dialect
        self.probe = probe
        self.writer = writer

    def read(self, read: Callable[[Any], Any]) -> Any:
        with self.probe.Session() as s:
            return read(s)


def _pg_schema(request: pytest.FixtureRequest) -> str:
    """A PostgreSQL schema of the test's own, dropped after it."""
    admin = create_engine(request.getfixturevalue("pg_sync_url"))
    schema = f"unseen_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    request.addfinalizer(drop)
    return schema


@pytest.fixture(params=["sqlite+memory", "postgres+redis"])
def world(request: pytest.FixtureRequest, tmp_path: pathlib.Path, key_prefix: str) -> Iterator[World]:
    if request.param == "sqlite+memory":
        url, args, backend = f"sqlite:///{tmp_path / 'test.db'}", {}, "memory://"
    else:
        url, args = _pg_schema_url(request.getfixturevalue("pg_sync_url"), _pg_schema(request))
        backend = request.getfixturevalue("redis_url")
    engine = create_engine(url, connect_args=args)
    writer = create_engine(url, connect_args=args)
    if request.param.startswith("sqlite"):
        wal(engine)
        wal(writer)
    _fill(writer)
    cache = Cache(backend, prefix=key_prefix)
    yield World(engine.dialect.name, Probe(engine, cache), writer)
    cache.invalidate_all()
    cache.close()
    engine.dispose()
    writer.dispose()


# -- DML on a Connection outside any session ----------------------------------------------------


def _core_begin(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(items).where(items.c.id == 1).values(name="new"))


def _connect_commit(engine: Any) -> None:
    with engine.connect() as conn:
        conn.execute(update(items).where(items.c.id == 1).values(name="new"))
        conn.commit()


def _driver_sql(engine: Any) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE unseen_items SET name = 'new' WHERE id = 1")


def _text(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE unseen_items SET name = :name WHERE id = 1"), {"name": "new"})


def _orm_update_on_connection(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(Item).where(Item.id == 1).values(name="new"))


@pytest.mark.parametrize(
    "write", [_core_begin, _connect_commit, _driver_sql, _text, _orm_update_on_connection]
)
def test_dml_on_a_connection_is_evicted_when_it_commits(world: World, write: Any) -> None:
    assert world.probe.cached(name_of) == "a"
    assert world.probe.cached(names) == ["a", "b"]
    write(world.writer)
    assert world.read(name_of) == "new"
    assert world.read(names) == ["new", "b"]


def test_dml_on_a_pooled_connection_that_sessions_used_before(world: World) -> None:
    """The application's own engine: the connection comes back from the pool after serving sessions."""
    assert world.probe.cached(name_of) == "a"
    _core_begin(world.probe.engine)
    assert world.read(name_of) == "new"


def test_insert_and_delete_on_a_connection(world: World) -> None:
    assert world.probe.cached(names) == ["a", "b"]
    assert world.probe.cached(lambda s: name_of(s, 3)) is None  # a cached "not found"
    with world.writer.begin() as conn:
        conn.execute(insert(items).values(id=3, name="c"))
    assert world.read(lambda s: name_of(s, 3)) == "c"
    assert world.read(names) == ["a", "b", "c"]
    with world.writer.begin() as conn:
        conn.execute(delete(children))
        conn.execute(delete(items).where(items.c.id == 3))
    assert world.read(lambda s: name_of(s, 3)) is None
    assert world.read(names) == ["a", "b"]


def test_insert_without_a_key_evicts_the_new_rows_reads(world: World) -> None:
    """The database picks the key (RETURNING or lastrowid): a cached "not found" of it goes."""
    if world.dialect == "postgresql":
        _script(world.writer, ["SELECT setval(pg_get_serial_sequence('unseen_items', 'id'), 2)"])
    assert world.probe.cached(lambda s: name_of(s, 3)) is None
    with world.writer.begin() as conn:
        conn.execute(insert(items).values(name="c"))
    assert world.read(lambda s: name_of(s, 3)) == "c"


def test_commit_sent_as_sql(world: World) -> None:
    """A COMMIT the driver runs as a statement commits too; the rollback at close finds nothing."""
    assert world.probe.cached(name_of) == "a"
    with world.writer.connect() as conn:
        conn.execute(update(items).where(items.c.id == 1).values(name="new"))
        conn.exec_driver_sql("COMMIT")
        assert world.read(name_of) == "new"
    assert world.read(name_of) == "new"


def test_a_write_that_cannot_be_analysed_evicts_the_whole_database(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert world.probe.cached(lambda s: name_of(s, 2)) == "b"

    def broken(statement: str, context: Any) -> Any:
        raise RuntimeError("a bug in the analysis")

    monkeypatch.setattr("sqlacache.write.executed.written", broken)
    _core_begin(world.writer)
    monkeypatch.undo()
    assert world.read(name_of) == "new"
    before = len(world.probe.sql)
    assert world.read(lambda s: name_of(s, 2)) == "b"
    assert len(world.probe.sql) > before, "every read of the database should have been evicted"
    assert "failed to record a write" in caplog.text


def test_a_connection_write_evicts_only_what_it_could_change(world: World) -> None:
    assert world.probe.cached(lambda s: name_of(s, 2)) == "b"
    _core_begin(world.writer)
    before = len(world.probe.sql)
    assert world.read(lambda s: name_of(s, 2)) == "b"
    assert len(world.probe.sql) == before, "row 2's entry should have survived a write to row 1"


def test_autocommit_writes_are_evicted_before_the_connection_commits_anything(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    with world.writer.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(update(items).where(items.c.id == 1).values(name="new"))
        assert world.read(name_of) == "new"


def test_a_rolled_back_connection_write_leaves_the_entries(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    with world.writer.connect() as conn:
        conn.execute(update(items).where(items.c.id == 1).values(name="new"))
        conn.rollback()
        conn.execute(update(items).where(items.c.id == 2).values(name="other"))  # never committed
    before = len(world.probe.sql)
    assert world.read(name_of) == "a"
    assert len(world.probe.sql) == before


def test_no_reader_serves_the_old_row_once_a_connection_commit_returns(world: World) -> None:
    """Readers keep reading (and storing) while a Core writer commits: every read that starts after
    a commit returned sees that commit. (Evicting before the database commits would let a reader
    store the old row again.)"""
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                world.read(name_of)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            with world.writer.begin() as conn:
                conn.execute(update(items).where(items.c.id == 1).values(name=f"v{i}"))
            assert world.read(name_of) == f"v{i}"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors


@pytest.mark.parametrize("db", ["aiosqlite+memory", "asyncpg+redis"])
async def test_async_connection_writes_are_evicted(
    db: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest, key_prefix: str
) -> None:
    if db == "aiosqlite+memory":
        url, args, backend = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}", {}, "memory://"
    else:
        schema = _pg_schema(request)
        url, args = _pg_schema_url(request.getfixturevalue("pg_async_url"), schema)
        backend = request.getfixturevalue("redis_url")
    engine = create_async_engine(url, connect_args=args)
    async with engine.begin() as conn:
        await conn.run_sync(_fill_sync)
    cache = Cache(backend, prefix=key_prefix)
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False)

    async def read() -> str | None:
        async with Session() as s:
            found = await s.get(Item, 1)
            return None if found is None else found.name

    for _ in range(3):
        assert await read() == "a"
    assert cache.stats()["hits"] > 0
    async with engine.begin() as conn:
        await conn.execute(update(items).where(items.c.id == 1).values(name="new"))
    assert await read() == "new"
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM unseen_items WHERE id = 1"))
    assert await read() is None
    await cache.ainvalidate_all()
    await cache.aclose()
    await engine.dispose()


def _fill_sync(conn: Any) -> None:
    Base.metadata.create_all(conn)
    conn.execute(insert(items), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])


# -- DDL: tables dropped, re-created, emptied, altered ------------------------------------------


def test_drop_all_and_create_all_on_an_engine(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    assert world.probe.cached(child_ids) == [10]
    Base.metadata.drop_all(world.writer)
    Base.metadata.create_all(world.writer)
    with world.writer.begin() as conn:
        conn.execute(insert(items).values(id=1, name="z"))
    assert world.read(name_of) == "z"
    assert world.read(names) == ["z"]
    assert world.read(child_ids) == []


def _script(engine: Any, *transactions: list[str]) -> None:
    """Raw SQL through ``exec_driver_sql``, one ``engine.begin()`` block per list."""
    for statements in transactions:
        with engine.begin() as conn:
            for sql in statements:
                conn.exec_driver_sql(sql)


def test_raw_drop_table_and_create_table(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    _script(
        world.writer,
        ["DROP TABLE unseen_children", "DROP TABLE unseen_items"],
        [
            "CREATE TABLE unseen_items (id INTEGER PRIMARY KEY, name VARCHAR(30))",
            "INSERT INTO unseen_items VALUES (1, 'z')",
        ],
    )
    assert world.read(name_of) == "z"


def test_a_table_dropped_unseen_then_created_again(world: World) -> None:
    """The drop goes straight through the driver (another tool: nothing in this process sees it);
    the CREATE TABLE that follows is seen, and is enough."""
    assert world.probe.cached(name_of) == "a"
    raw = world.writer.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("DROP TABLE unseen_children")
        cursor.execute("DROP TABLE unseen_items")
        raw.commit()
    finally:
        raw.close()
    with world.writer.begin() as conn:
        conn.execute(text("CREATE TABLE unseen_items (id INTEGER PRIMARY KEY, name VARCHAR(30))"))
        conn.execute(text("INSERT INTO unseen_items VALUES (1, 'z')"))
    assert world.read(name_of) == "z"


@pytest.mark.parametrize("how", ["connection", "session"])
def test_ddl_in_a_transaction_that_rolls_back(world: World, how: str) -> None:
    """PostgreSQL rolls the DROP back; SQLite's driver has already committed it (no BEGIN before
    DDL), and so would MySQL. Either way the next read is the database's truth."""
    assert world.probe.cached(child_ids) == [10]
    if how == "connection":
        with world.writer.connect() as conn:
            conn.exec_driver_sql("DROP TABLE unseen_children")
            conn.rollback()
    else:
        with world.probe.Session() as s:
            s.execute(text("DROP TABLE unseen_children"))
            s.execute(text("CREATE TABLE unseen_children (id INTEGER PRIMARY KEY, item_id INTEGER)"))
            s.execute(text("INSERT INTO unseen_children VALUES (11, 1)"))
            s.rollback()
    with world.writer.connect() as conn:
        try:
            truth = [row[0] for row in conn.exec_driver_sql("SELECT id FROM unseen_children ORDER BY id")]
        except Exception:
            truth = None  # dropped
    if truth is None:
        with pytest.raises(Exception, match="unseen_children"):
            world.read(child_ids)
    else:
        assert world.read(child_ids) == truth


POSTGRES_ONLY = pytest.mark.parametrize("world", ["postgres+redis"], indirect=True)


@POSTGRES_ONLY  # SQLite has no TRUNCATE: DELETE without WHERE, tested below
@pytest.mark.parametrize("how", ["connection", "session"])
def test_truncate_cascade_empties_the_referencing_tables_too(world: World, how: str) -> None:
    assert world.probe.cached(name_of) == "a"
    assert world.probe.cached(child_ids) == [10]
    if how == "connection":
        with world.writer.begin() as conn:
            conn.exec_driver_sql("TRUNCATE unseen_items CASCADE")
    else:
        with world.probe.Session() as s:
            s.execute(text("TRUNCATE unseen_items CASCADE"))
            s.commit()
    assert world.read(child_ids) == []
    assert world.read(name_of) is None


@POSTGRES_ONLY  # ALTER COLUMN … TYPE … USING
def test_alter_table_that_rewrites_values(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    with world.writer.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE unseen_items ALTER COLUMN name TYPE VARCHAR(30) USING upper(name)")
    assert world.read(name_of) == "A"


def test_alter_table_rename_swaps_a_table_in(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    _script(
        world.writer,
        [
            "CREATE TABLE unseen_next (id INTEGER PRIMARY KEY, name VARCHAR(30))",
            "INSERT INTO unseen_next VALUES (1, 'swapped')",
        ],
        [
            "ALTER TABLE unseen_items RENAME TO unseen_previous",
            "ALTER TABLE unseen_next RENAME TO unseen_items",
        ],
    )
    assert world.read(name_of) == "swapped"


@pytest.mark.parametrize("how", ["driver_sql", "core"])
def test_delete_without_where(world: World, how: str) -> None:
    assert world.probe.cached(child_ids) == [10]
    with world.writer.begin() as conn:
        if how == "driver_sql":
            conn.exec_driver_sql("DELETE FROM unseen_children")
        else:
            conn.execute(delete(children))
    assert world.read(child_ids) == []


def test_the_outbox_relays_own_deletes_invalidate_nothing(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    _fill(engine)
    cache = Cache("memory://")
    cache.use_outbox(engine, grace=60, interval=0.02)
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        s.get(Item, 1).name = "new"
        s.commit()
    assert cache.stats()["invalidations"] == 1

    def outbox_rows() -> int:
        with engine.connect() as conn:
            return len(conn.exec_driver_sql("SELECT id FROM sqlacache_outbox").all())

    assert until(lambda: outbox_rows() == 0)  # the relay deleted the delivered row
    assert cache.stats()["invalidations"] == 1
    cache.close()
    engine.dispose()


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("CREATE TABLE IF NOT EXISTS t (id int)", {"t"}),
        ("DROP TABLE IF EXISTS a, s.b CASCADE", {"a", "s.b", "b"}),
        ("TRUNCATE a, b RESTART IDENTITY CASCADE", {"a", "b"}),
        ("ALTER TABLE a RENAME TO b", {"a", "b"}),
        ("CREATE OR REPLACE VIEW v AS SELECT 1", {"v"}),
        ("CREATE INDEX i ON t (a)", set()),
        ("DROP TRIGGER x ON t", set()),
        ("CREATE OR REPLACE FUNCTION f() RETURNS trigger AS $f$ BEGIN DELETE FROM t; END $f$", set()),
        ("CREATE FUNCTION f(a int) RETURNS int AS $$ SELECT 1; $$", None),  # queries may call it
    ],
)
def test_tables_ddl_names(sql: str, tables: set[str] | None) -> None:
    assert written_tables(sql) == tables


@POSTGRES_ONLY
def test_installing_notify_triggers_evicts_nothing(world: World) -> None:
    assert world.probe.cached(name_of) == "a"
    install_triggers(world.writer, Base.metadata)
    before = len(world.probe.sql)
    assert world.read(name_of) == "a"
    assert len(world.probe.sql) == before


# -- another mapping of the same class -----------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: pathlib.Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


def _items_table(url: str, table: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, a VARCHAR(20), b VARCHAR(20))"))
        conn.execute(text(f"INSERT INTO {table} VALUES (1, 'A', 'B')"))
    engine.dispose()


def test_another_mapping_of_the_same_class_never_reads_the_entry(sqlite_url: str) -> None:
    _items_table(sqlite_url, "items")
    engine = create_engine(sqlite_url)
    probe = Probe(engine, Cache("memory://"))
    Old = deploy_app.build("old", "items")
    New = deploy_app.build("new", "items")  # same module, qualname and table; attributes swapped
    assert probe.cached(lambda s: (s.get(Old, 1).name, s.get(Old, 1).nick)) == ("A", "B")
    assert probe.cached(lambda s: s.scalars(select(Old).where(Old.id == 1)).one().name) == "A"
    with probe.Session() as s:
        assert (s.get(New, 1).name, s.get(New, 1).nick) == ("B", "A")
        assert s.scalars(select(New).where(New.id == 1)).one().name == "B"
    # Both cached in one process: each entry decodes into its own mapping's class.
    assert probe.cached(lambda s: (type(s.get(New, 1)), s.get(New, 1).name)) == (New, "B")
    assert probe.cached(lambda s: s.scalars(select(New).where(New.id == 1)).one().name) == "B"
    assert probe.cached(lambda s: (type(s.get(Old, 1)), s.get(Old, 1).name)) == (Old, "A")
    assert probe.cached(lambda s: s.scalars(select(Old).where(Old.id == 1)).one().name) == "A"
    assert probe.cache.stats().get("corrupt", 0) == 0
    engine.dispose()


def _deploy_run(version: str, table: str, pg_url: str, redis_url: str, prefix: str) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, "-m", "tests.deploy_app", version, table, pg_url, redis_url, prefix],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.returncode == 0, child.stderr
    found: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return found


def test_rolling_deploy_old_and_new_code_never_read_each_others_entries(
    pg_sync_url: str, redis_url: str, key_prefix: str
) -> None:
    table = f"items_{uuid.uuid4().hex[:8]}"
    _items_table(pg_sync_url, table)
    engine = create_engine(pg_sync_url)
    cache = Cache(redis_url, prefix=key_prefix)
    try:
        Old = deploy_app.build("old", table)
        probe = Probe(engine, cache)
        old_values = [["A", "B"], ["A", "B"]]
        assert probe.cached(lambda s: deploy_app.read(probe.Session, Old)) == old_values
        # Another process running the same code shares the entries: the fingerprint is the same there.
        same = _deploy_run("old", table, pg_sync_url, redis_url, key_prefix)
        assert same["values"] == old_values and same["get_hit"]
        # The new code misses, and reads the database's truth as it maps it.
        new = _deploy_run("new", table, pg_sync_url, redis_url, key_prefix)
        assert new["values"] == [["B", "A"], ["B", "A"]]
        assert new["hits"] == 0 and new["corrupt"] == 0
        # Its entries are not the old code's either: the old entries are still there, and still right.
        assert probe.cached(lambda s: deploy_app.read(probe.Session, Old)) == old_values
        assert cache.stats().get("corrupt", 0) == 0
    finally:
        cache.invalidate_all()
        cache.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()
