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
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession
from tests import deploy_app

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
