"""A transactional outbox: a commit's invalidation written in the commit's own transaction.

Without it, an invalidation that can't reach Redis is kept in the committing process's memory and
retried; if that process dies first, it is lost, and other processes may serve what it invalidated
until the entries expire. With ``cache.use_outbox(engine)``, every commit of a session that wrote
something also inserts one row into ``sqlacache_outbox`` — in the same transaction, so the row
exists exactly when the commit does. After the commit the invalidation is delivered as usual and
the row deleted (in batches, by a background thread); a row still there after ``grace`` seconds
(its process could not deliver it, or died) is delivered and deleted by the relay of any process
using the outbox. An invalidation can then be late, but never lost.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import Column, Engine, Float, MetaData, String, Table, Text, delete, insert, select

from sqlacache.analysis import dependencies as deps_mod
from sqlacache.resilience.resilient import Resilient
from sqlacache.resilience.stats import Counters

log = logging.getLogger("sqlacache.outbox")

TABLE_NAME = "sqlacache_outbox"
metadata = MetaData()
#: The outbox table; add it to your migrations, or let ``Cache.use_outbox`` create it.
table = Table(
    TABLE_NAME,
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created", Float, nullable=False),  # time.time() of the writer: the relay's grace
    Column("payload", Text, nullable=False),  # {"d": [dependency, ...], "r": [row image, ...]}
)
#: Execution option on the outbox's own statements (the write tracker leaves them alone).
OPTION = "sqlacache_outbox"

_MAX_DEPS = 2000  # beyond this a row records the written tables instead (coarser, still complete)


def encode(deps: Sequence[str], rows: Sequence[deps_mod.RowImage]) -> str:
    if len(deps) + len(rows) > _MAX_DEPS:
        tables = {deps_mod.table_of_dep(d) for d in deps} | {r[0] for r in rows}
        if None in tables:  # a dependency of a whole database, or everything
            deps = [deps_mod.ALL]
        else:
            deps = [
                dep for t in sorted(t for t in tables if t) for dep in deps_mod.unknown_rows_write_deps(t)
            ]
        rows = []
    return orjson.dumps({"d": list(deps), "r": [list(r) for r in rows]}).decode()


def decode(payload: str) -> tuple[list[str], list[deps_mod.RowImage]]:
    data = orjson.loads(payload)
    return list(data["d"]), [(t, dict(values), guard) for t, values, guard in data["r"]]


class Outbox:
    """The outbox of one cache: which databases have one, and the relay thread."""

    def __init__(self, io: Resilient, count: Counters, grace: float, interval: float) -> None:
        self.io = io  # the cache's backend calls
        self.count = count
        self.grace = grace
        self.interval = interval
        self.engines: dict[str, Engine] = {}  # database id → the engine the relay uses
        self._delivered: list[tuple[str, str]] = []  # (database id, row id) to delete
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, database: str, engine: Engine) -> None:
        metadata.create_all(engine, checkfirst=True)
        with self._lock:
            self.engines[database] = engine
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sqlacache-outbox", daemon=True)
                self._thread.start()

    def write(self, connection: Any, database: str, payload: str) -> str | None:
        """Insert the row on the committing transaction's ``connection``; its id, if there is one."""
        if database not in self.engines:
            return None
        row_id = uuid.uuid4().hex
        connection.execute(
            insert(table).values(id=row_id, created=time.time(), payload=payload),
            execution_options={OPTION: True},
        )
        return row_id

    def delivered(self, rows: Sequence[tuple[str, str]]) -> None:
        with self._lock:
            self._delivered.extend(rows)

    def relay(self) -> int:
        """Delete delivered rows; deliver and delete rows older than ``grace``. Returns how many
        rows this relayed."""
        with self._lock:
            done, self._delivered = self._delivered, []
            engines = dict(self.engines)
        relayed = 0
        for database, engine in engines.items():
            ids = [row_id for db, row_id in done if db == database]
            try:
                if ids:
                    with engine.begin() as conn:
                        conn.execute(
                            delete(table).where(table.c.id.in_(ids)), execution_options={OPTION: True}
                        )
                relayed += self._relay_old(engine)
            except Exception as exc:  # the database is down too: next time
                with self._lock:
                    self._delivered.extend((database, i) for i in ids)
                self.io.warn("outbox", "sqlacache: outbox relay failed: %s", exc)
        return relayed

    def _relay_old(self, engine: Engine) -> int:
        with engine.connect() as conn:
            old = conn.execute(
                select(table.c.id, table.c.payload)
                .where(table.c.created < time.time() - self.grace)
                .order_by(table.c.created)
                .limit(100)
            ).all()
        relayed = []
        for row_id, payload in old:
            try:
                deps, rows = decode(payload)
            except (ValueError, KeyError, TypeError):
                deps, rows = [deps_mod.ALL], []  # unreadable: evict everything rather than nothing
            if not self.io.deliver(sorted(set(deps)), rows):
                break  # Redis is still unreachable: keep the rest for later
            relayed.append(row_id)
        if relayed:
            with engine.begin() as conn:
                conn.execute(delete(table).where(table.c.id.in_(relayed)), execution_options={OPTION: True})
            self.count("outbox_relayed", len(relayed))
        return len(relayed)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.relay()
            except Exception as exc:  # the thread must outlive anything one round does
                self.io.warn("outbox", "sqlacache: outbox relay failed", exc_info=exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.relay()  # delete what was delivered
