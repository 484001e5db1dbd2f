"""The write path: flush → tracker → commit → eviction.

Rows written by the unit of work are recorded per row (table, primary key, old and new values);
everything else executed on the session's connections — ORM bulk and Core DML, raw SQL, the
association-table rows of a flush — is recorded per table. Records live in the frame of the
transaction or savepoint that wrote them: releasing a savepoint hands its records to the enclosing
one, rolling it back drops them, and only the outermost commit turns them into invalidations,
which have been delivered (or queued for retry) by the time ``commit()`` returns. Statements on
connections that belong to no session go to ``connection_writes``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table, event
from sqlalchemy.orm import Mapper, Session, SessionTransaction
from sqlalchemy.orm.base import instance_state
from sqlalchemy.pool import Pool
from sqlalchemy.sql.schema import Column

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis import dml, rowtokens
from sqlacache.cache import database_id, watchers
from sqlacache.context import SessionContext, TxFrame, any_context, write_context
from sqlacache.layout import KNOWN, layout_of
from sqlacache.resilience import outbox
from sqlacache.write import connections as connection_writes
from sqlacache.write import executed

log = logging.getLogger("sqlacache.tracker")


@dataclass(frozen=True)
class Evictions:
    """What a commit is about to evict: dependency names (see ``analysis/dependencies.py``: ``t:``
    a table, ``r:`` a row by primary key, ``a:`` all rows of a table, ``d:`` a database, ``*``
    everything…), the written rows' images (table, {column: token}, guard) from which the backend
    evicts the condition reads they match, and the tables whose reads it evicts."""

    deps: frozenset[str]
    rows: tuple[deps_mod.RowImage, ...]
    tables: frozenset[str]


class UnitOfWorkTracker:
    """The write path's recorder: listeners on ``Session`` (installed when sqlacache is imported)
    that record what each transaction writes, per row for the unit of work and per table for other
    DML, and turn it into evictions when the outermost transaction commits (a rolled back
    savepoint's records are dropped, a released one's go to the enclosing transaction).

    For tests and debugging: :meth:`pending` tells what a session's commit would evict now.
    """

    @staticmethod
    def pending(session: Any) -> Evictions:
        """What ``session`` (a ``Session`` or ``AsyncSession``) has recorded in its transaction
        and savepoints and not yet committed: what its commit would evict. Only flushed writes
        are recorded: call ``session.flush()`` first to include pending changes."""
        sync = getattr(session, "sync_session", session)
        ctx = any_context(sync)
        if ctx is None:
            return Evictions(frozenset(), (), frozenset())
        deps: set[str] = set()
        rows: list[deps_mod.RowImage] = []
        for frame in ctx.tx.values():
            deps |= frame.deps
            rows.extend(frame.rows)
            for _context, table, _positions, _dialect in frame.returning:  # keys known at commit
                deps.add(deps_mod.allrows_dep(deps_mod.table_name(table)))
        tables = {d[2:] for d in deps if d.startswith("t:")} | {row[0] for row in rows}
        return Evictions(frozenset(deps), tuple(rows), frozenset(tables))


_TAG = "_sqlacache_ctx"
_SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def _never_raise(listener: Callable[..., None]) -> Callable[..., None]:
    """A failure while recording a write must not break the write: log it, and have the commit
    evict everything instead (when we can still reach the session's context)."""

    @functools.wraps(listener)
    def guarded(*args: Any) -> None:
        try:
            listener(*args)
        except Exception:
            log.exception("sqlacache: failed to record a write; the commit will evict everything")
            session = next((a for a in args if isinstance(a, Session)), None)
            if session is None:
                state = next((instance_state(a) for a in args if _sa.has_instance_state(a)), None)
                session = state.session if state is not None else None
            ctx = any_context(session) if session is not None else None
            if session is not None and ctx is not None:
                with contextlib.suppress(Exception):
                    record(ctx, session, [deps_mod.ALL], set())
                ctx.written_everything = True

    return guarded


def _owner(session: Session) -> SessionTransaction | None:
    """The transaction whose commit publishes a write made now: the innermost savepoint or the root."""
    t = _sa.current_transaction(session)
    while t is not None and not (t.nested or t.parent is None):
        t = t.parent
    return t


def _frame(ctx: SessionContext, session: Session) -> TxFrame:
    owner = _owner(session)
    frame = ctx.tx.get(owner)
    if frame is None:
        frame = ctx.tx[owner] = TxFrame()
    return frame


def record(
    ctx: SessionContext,
    session: Session,
    deps: list[str],
    tables: set[str],
    rows: list[deps_mod.RowImage] | None = None,
) -> None:
    frame = _frame(ctx, session)
    frame.deps.update(deps)
    if rows:
        frame.rows.extend(rows)
    ctx.written |= tables


# -- unit-of-work rows ------------------------------------------------------------------------


def _row_write(op: str, mapper: Mapper[Any], connection: Any, target: Any) -> None:
    state = instance_state(target)
    session = state.session
    if session is None:
        return
    ctx = write_context(session, connection.engine)
    if ctx is None:
        return
    layout = layout_of(state.mapper)
    dict_ = state.dict
    committed = state.committed_state
    pk = tuple(dict_.get(k) for k in layout.pk_keys)
    loaded = {k: dict_[k] for k in layout.columns if k in dict_}
    # Old values: as committed before this flush (changed attributes) or as loaded (the others).
    old = {} if op == "insert" else {**loaded, **{k: committed[k] for k in layout.columns if k in committed}}
    new = {} if op == "delete" else loaded
    pks = {pk}
    if op != "insert" and any(k in committed for k in layout.pk_keys):
        pks.add(tuple(old.get(k) for k in layout.pk_keys))
    dialect = connection.dialect
    depset: list[str] = []
    tables: set[str] = set()
    for key in pks:
        tokens = rowtokens.pk_tokens(state.mapper, key, dialect)
        for table in state.mapper.tables:
            depset += deps_mod.row_write_deps(deps_mod.table_name(table), tokens)
    # Written values are exact. Values the object was loaded with (an update's unchanged columns
    # and old values, a delete's row) may be older than the database: they count only if the
    # table had no committed write since they were loaded (checked when the eviction runs).
    remembered = state.info.get(KNOWN) if "info" in state.__dict__ else None
    guard = remembered[1] if remembered is not None else None
    images: list[deps_mod.RowImage] = []
    if op == "insert":
        images += rowtokens.images(state.mapper, new, dialect)
    elif guard is None:
        # Loaded outside the cache: when is unknown, so every condition read of the table goes.
        depset += [deps_mod.scheme_dep(deps_mod.table_name(t)) for t in state.mapper.tables]
    else:
        for values in (old, new) if op == "update" else (old,):
            images += rowtokens.images(state.mapper, values, dialect, guard)
    for table in state.mapper.tables:
        tables.add(deps_mod.table_name(table))
        if op != "insert" and isinstance(table, Table):
            changed = {
                c.name
                for k in committed
                if k in layout.columns
                for c in state.mapper.attrs[k].columns
                if isinstance(c, Column)
            }
            for other in deps_mod.cascade_closure(table, op, changed):
                depset += deps_mod.unknown_rows_write_deps(other)
                tables.add(other)
    ctx.flush_row_tables |= tables
    record(ctx, session, depset, tables, images)


for _op in ("insert", "update", "delete"):

    @_never_raise
    def _listener(mapper: Mapper[Any], connection: Any, target: Any, _op: str = _op) -> None:
        _row_write(_op, mapper, connection, target)

    event.listen(Mapper, f"after_{_op}", _listener)


# -- everything else executed on the session's connections -------------------------------------


@event.listens_for(Engine, "after_cursor_execute")
@_never_raise
def _after_cursor_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    tag = conn.info.get(_TAG)
    session = tag() if tag is not None else None
    ctx = any_context(session) if session is not None else None
    if session is None or ctx is None:
        connection_writes.executed(conn, statement, context)  # outside any session
        return
    if context.execution_options.get(outbox.OPTION):
        return  # the outbox's own row: part of the commit's bookkeeping, not a write to cache
    found = executed.written(statement, context)
    if found is None:
        return
    tables = found.tables
    if _sa.is_flushing(session) and tables is not None:
        # Rows of mapped tables are recorded by the mapper events; the others (association
        # tables of many-to-many) are settled after the flush, from the statements kept here.
        own = deps_mod.table_name(found.table) if found.compiled is not None else None
        for name in tables:
            kept = ctx.flush_dml.setdefault(name, [])
            if kept is None:
                continue
            if name == own:
                kept.append((found.compiled, context.compiled_parameters, conn.dialect))
            else:
                ctx.flush_dml[name] = None  # cascaded, or raw SQL: rows unknown
        return
    if tables is None:
        executed.warn_unknown(statement)
        everything = [deps_mod.database_dep(database_id(conn.engine))]
        record(ctx, session, everything, set())
        ctx.written_everything = True
        return
    effects = executed.effects(found, context, conn.dialect, ctx.cache.precise, ctx.cache.condition_in_limit)
    if effects.returning:
        _frame(ctx, session).returning.extend(effects.returning)
    record(ctx, session, effects.deps, tables, effects.rows)
    if found.ddl:
        # Some databases commit DDL at once (MySQL, SQLite outside a transaction): evict now as well.
        for cache in {ctx.cache, *watchers(conn.engine)}:
            cache.internal.bump(effects.deps)


# -- session transaction lifecycle -------------------------------------------------------------


@event.listens_for(Session, "after_begin")
@_never_raise
def _after_begin(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    ctx = write_context(session, connection.engine)
    if ctx is None:
        return
    # Only a weak reference: the pool's connection record outlives the session, and an abandoned
    # session must stay collectable (SQLAlchemy returns its connection to the pool when it is).
    connection.info[_TAG] = weakref.ref(session)
    ctx.connections.append(connection)
    ctx.engines.add(connection.engine)
    if ctx.reads and ctx.tx_generation is None:
        level = (
            connection.get_execution_options().get("isolation_level")
            or connection.default_isolation_level
            or ""
        ).upper()
        if level in _SNAPSHOT_LEVELS:
            # The database snapshot may be taken at the first statement of this transaction: a
            # result read later in it is only as fresh as now.
            generation = ctx.cache.io.generation()
            ctx.tx_generation = generation if generation is not None else -1


@event.listens_for(Session, "after_flush")
@_never_raise
def _after_flush(session: Session, flush_context: Any) -> None:
    ctx = any_context(session)
    if ctx is None:
        return
    depset: list[str] = []
    images: list[deps_mod.RowImage] = []
    others: set[str] = set()
    for name, kept in ctx.flush_dml.items():
        if name in ctx.flush_row_tables:
            continue
        others.add(name)
        found = None
        if kept is not None and ctx.cache.precise:
            results = [dml.effects(c, p, d, ctx.cache.condition_in_limit) for c, p, d in kept]
            if all(r is not None for r in results):
                found = [r for r in results if r is not None]
        if found is None:
            depset += deps_mod.unknown_rows_write_deps(name)
        else:
            for deps, rows, keyless in found:
                depset += deps
                images += rows
                if keyless:
                    depset.append(deps_mod.allrows_dep(name))
    if others:
        record(ctx, session, depset, others, images)
    ctx.flush_dml = {}
    ctx.flush_row_tables = set()


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    """With an outbox: write this transaction's invalidation into it, inside the transaction.

    Not guarded like the other listeners: a commit whose invalidation can't be recorded must fail,
    that is what the outbox is for."""
    ctx = any_context(session)
    transaction = _sa.current_transaction(session)
    if ctx is None or ctx.cache.outbox is None or transaction is None or transaction.nested:
        return
    session.flush()  # the commit's own flush would come after this listener
    frame = ctx.tx.get(transaction)
    if frame is None or not (frame.deps or frame.rows or frame.returning):
        return
    deps = set(frame.deps)
    for _context, table, _positions, _dialect in frame.returning:  # their keys are known after commit
        deps.add(deps_mod.allrows_dep(deps_mod.table_name(table)))
    payload = outbox.encode(sorted(deps), frame.rows)
    for connection in ctx.connections:
        database = database_id(connection.engine)
        row_id = ctx.cache.outbox.write(connection, database, payload)
        if row_id is not None:
            ctx.outbox_rows.append((database, row_id))


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    ctx = any_context(session)
    if ctx is None:
        return
    committing = _sa.current_transaction(session)
    frame = ctx.tx.pop(committing, None)
    if committing is None or frame is None:
        return
    if committing.nested:
        parent = committing.parent
        while parent is not None and not (parent.nested or parent.parent is None):
            parent = parent.parent
        target = ctx.tx.get(parent)
        if target is None:
            ctx.tx[parent] = frame
        else:
            target.deps |= frame.deps
            target.rows.extend(frame.rows)
            target.returning.extend(frame.returning)
        return
    for context, table, positions, dialect in frame.returning:
        frame.deps.update(executed.returned_keys(context, table, positions, dialect))
    caches = {ctx.cache}
    for engine in ctx.engines:
        caches.update(watchers(engine))
    for cache in caches:
        delivered = cache.internal.bump(frame.deps, frame.rows)
        if cache is ctx.cache and ctx.outbox_rows and cache.outbox is not None:
            if delivered:  # else its row stays: the relay delivers it (this process may die first)
                cache.outbox.delivered(ctx.outbox_rows)
            ctx.outbox_rows = []


@event.listens_for(Pool, "checkin")
def _checkin(dbapi_connection: Any, record: Any) -> None:
    """A connection back in the pool belongs to no session: what runs on it next is not the
    session's (its ``info`` outlives the ``Connection`` the session closed)."""
    if record is not None:
        record.info.pop(_TAG, None)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    ctx = any_context(session)
    if ctx is None:
        return
    # Whatever is still recorded for this transaction was not committed: drop it.
    ctx.tx.pop(transaction, None)
    if transaction.parent is None:
        for connection in ctx.connections:
            with contextlib.suppress(Exception):  # closed: untagged when it went back to the pool
                connection.info.pop(_TAG, None)
        ctx.connections.clear()
        ctx.engines.clear()
        ctx.tx.clear()
        ctx.written.clear()
        ctx.written_everything = False
        ctx.outbox_rows = []
        ctx.tx_generation = None
        ctx.near_at = None
