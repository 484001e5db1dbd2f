"""Writes on engine connections outside any session, invalidated when their transaction commits.

Core ``conn.execute(insert/update/delete(…))``, ``engine.begin()`` blocks, ``exec_driver_sql`` and
``text()`` DML, DDL (``metadata.create_all``/``drop_all``, TRUNCATE, ALTER) on a database that some
cache watches are analysed as a session's are (``executed``) and recorded on the DBAPI connection.
The record is delivered to every cache watching the database right after the driver's commit
returns, so before ``Connection.commit()`` (or the end of an ``engine.begin()`` block) returns; a
rollback drops it. A statement that commits by itself is delivered at once: under autocommit, and
DDL (which some databases commit implicitly, with what the transaction wrote before it).

SQLAlchemy has no event after a commit (``ConnectionEvents.commit`` runs before it: evicting then
would let a reader store the old rows again before they change), so the dialect's ``do_commit`` of
an engine that wrote is wrapped, once; commits also come through it from the pool's reset.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.cache import database_id, watched, watchers
from sqlacache.resilience import outbox
from sqlacache.write import executed as executed_mod

log = logging.getLogger("sqlacache.tracker")

_KEY = "sqlacache.connection_writes"  # in Connection.info, which belongs to the DBAPI connection
_HOOKED = "_sqlacache_commit_hooked"
_COMMIT_SQL = re.compile(r"^\s*(?:COMMIT|END)\b", re.I)
_hook_lock = threading.Lock()


@dataclass(slots=True)
class _Pending:
    """What the DBAPI connection's open transaction wrote, not yet committed."""

    engine: Engine
    deps: set[str] = field(default_factory=set)
    rows: list[deps_mod.RowImage] = field(default_factory=list)
    returning: list[Any] = field(default_factory=list)


def executed(conn: Any, statement: str, context: Any) -> None:
    """Record what a statement run outside any session writes (from ``after_cursor_execute``)."""
    try:
        _record(conn, statement, context)
    except Exception:  # never break the statement; evict the whole database instead of nothing
        log.exception("sqlacache: failed to record a write; evicting every cached read of the database")
        pending = conn.info.get(_KEY)
        if pending is None:
            pending = conn.info[_KEY] = _Pending(conn.engine)
            _hook(conn.engine.dialect)
        pending.deps.add(deps_mod.database_dep(database_id(conn.engine)))
        _deliver(pending)  # now (it may be committed already) and at commit


def _record(conn: Any, statement: str, context: Any) -> None:
    pending: _Pending | None = conn.info.get(_KEY)
    if pending is not None and _COMMIT_SQL.match(statement):
        del conn.info[_KEY]  # a COMMIT sent as SQL
        _deliver(pending)
        return
    if not watched(conn.engine) or context.execution_options.get(outbox.OPTION):
        return
    found = executed_mod.written(statement, context)
    if found is None:
        return
    caches = watchers(conn.engine)
    if not caches:
        return
    if found.tables is None:
        executed_mod.warn_unknown(statement)
        effects = executed_mod.Effects([deps_mod.database_dep(database_id(conn.engine))])
    else:
        limit = max(c.condition_in_limit for c in caches)
        effects = executed_mod.effects(found, context, conn.dialect, True, limit)
    if pending is None:
        pending = _Pending(conn.engine)
    pending.deps.update(effects.deps)
    pending.rows.extend(effects.rows)
    pending.returning.extend(effects.returning)
    if _autocommits(conn):
        conn.info.pop(_KEY, None)
        # RETURNING rows are fetched after this event: their keys are not known yet.
        pending.deps.update(deps_mod.allrows_dep(deps_mod.table_name(t)) for _, t, _, _ in pending.returning)
        pending.returning.clear()
        _deliver(pending)
        return
    if _KEY not in conn.info:
        _hook(conn.engine.dialect)
        conn.info[_KEY] = pending
    if found.ddl:
        _deliver(pending)  # and again at commit: PostgreSQL's DDL is transactional, MySQL's is not


def _autocommits(conn: Any) -> bool:
    """Whether the statement that just ran is already committed."""
    if _sa.autocommit_isolation(conn):
        return True  # isolation_level="AUTOCOMMIT" on the engine or the connection
    dbapi = conn.connection.dbapi_connection
    # Autocommit set on the driver itself (psycopg, asyncpg); sqlite3 outside any transaction.
    return getattr(dbapi, "autocommit", None) is True or getattr(dbapi, "in_transaction", None) is False


def _deliver(pending: _Pending) -> None:
    deps = set(pending.deps)
    for context, table, positions, dialect in pending.returning:
        deps.update(executed_mod.returned_keys(context, table, positions, dialect))
    for cache in watchers(pending.engine):
        cache.internal.bump(deps, pending.rows)


def _committed(info: Any) -> None:
    """The transaction of the DBAPI connection whose ``info`` this is has just committed."""
    try:
        pending = info.pop(_KEY, None) if isinstance(info, dict) else None
        if pending is not None:
            _deliver(pending)
    except Exception:  # the commit happened: never turn it into an error
        log.exception("sqlacache: failed to invalidate what a connection's commit changed")


def _hook(dialect: Any) -> None:
    """Make ``dialect`` report its connections' commits (once per dialect: one per engine)."""
    if dialect.__dict__.get(_HOOKED):
        return
    with _hook_lock:
        if dialect.__dict__.get(_HOOKED):
            return
        do_commit = dialect.do_commit
        do_commit_twophase = dialect.do_commit_twophase

        @functools.wraps(do_commit)
        def committing(dbapi_connection: Any) -> None:
            do_commit(dbapi_connection)
            _committed(getattr(dbapi_connection, "info", None))  # the pool's proxy: Connection.info

        @functools.wraps(do_commit_twophase)
        def committing_twophase(connection: Any, *args: Any, **kwargs: Any) -> None:
            do_commit_twophase(connection, *args, **kwargs)
            _committed(connection.info)

        dialect.do_commit = committing
        dialect.do_commit_twophase = committing_twophase
        dialect.__dict__[_HOOKED] = True


@event.listens_for(Engine, "begin")
@event.listens_for(Engine, "rollback")
def _drop(conn: Any) -> None:
    """Rolled back, or a new transaction: what an unfinished one recorded was never committed."""
    if conn.invalidated:
        # Reading an invalidated connection's info would try to reconnect (and raise): nothing
        # recorded survives invalidation anyway, the pool record's info goes with its connection.
        return
    if _KEY in conn.info:
        del conn.info[_KEY]
