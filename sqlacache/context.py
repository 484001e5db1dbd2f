"""Per-session state: which cache a session uses, what its transaction has written, what it is capturing.

Kept on the sync ``Session`` as ``session._sqlacache`` so both the read path and the write path reach
it in one attribute lookup, for ``CachingSession`` and for plain sessions on an engine bound with
``Cache.bind``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from sqlacache.cache import Cache


@dataclass(slots=True)
class Frame:
    """One read in progress: the objects it created from rows, with the values they were loaded with."""

    generation: int | None  # the generation the read began at (None: unknown, nothing is stored)
    fresh: dict[Any, dict[str, Any]] = field(default_factory=dict)  # state → column values as loaded
    deps: set[str] = field(default_factory=set)  # dependencies of nested reads served meanwhile
    unstorable: str | None = None


@dataclass(slots=True)
class TxFrame:
    """Writes recorded inside one transaction or savepoint, not yet committed."""

    deps: set[str] = field(default_factory=set)
    rows: list[Any] = field(default_factory=list)  # row images (table, {column: token}), old and new
    # DML whose written keys RETURNING will tell: (execution context, mapper-less table, dialect).
    returning: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class SessionContext:
    cache: Cache
    # False for a plain session on a database some cache reads: its writes are tracked, its reads not.
    reads: bool = True
    # A plain session that routes statements itself (binds=, get_bind()): each read is checked
    # against Cache.bind's engines (see binding.py).
    routed: bool = False
    frames: list[Frame] = field(default_factory=list)
    # Keyed by SessionTransaction (root or savepoint): what each has written and not yet committed.
    tx: dict[Any, TxFrame] = field(default_factory=dict)
    # Tables this root transaction has written: reads of them bypass the cache until it ends.
    written: set[str] = field(default_factory=set)
    # Under REPEATABLE READ / SERIALIZABLE: the generation taken when the transaction began.
    tx_generation: int | None = None
    # Raw SQL we could not read was executed: every read bypasses the cache until the end.
    written_everything: bool = False
    # Connections tagged as belonging to this session's transaction (untagged at its end).
    connections: list[Any] = field(default_factory=list)
    # Engines this transaction used: its commit invalidates every cache watching their databases.
    engines: set[Any] = field(default_factory=set)
    # Tables DML touched during the current flush, and those the mapper events accounted for.
    # Per table: the DML statements (compiled, parameters, dialect) a flush ran, None if unknown.
    flush_dml: dict[str, list[Any] | None] = field(default_factory=dict)
    flush_row_tables: set[str] = field(default_factory=set)
    # (root transaction, fan-out position) for near_coherence="strict": read at the transaction's
    # first read from memory, which serves only once the subscriber has applied up to it.
    near_at: tuple[Any, Any] | None = None
    # (database, row id) of the outbox rows this transaction wrote (see outbox.py).
    outbox_rows: list[tuple[str, str]] = field(default_factory=list)


def context_of(session: Session) -> SessionContext | None:
    ctx: SessionContext | None = session.__dict__.get("_sqlacache")
    if ctx is not None:
        return ctx
    cache = session.__dict__.get("_sqlacache_cache")
    if cache is False:  # a plain session on an engine that isn't bound: looked up once, not cached
        return None
    routed = False
    if cache is None:
        from sqlacache.binding import bound_cache, routes_itself

        cache = bound_cache(session)
        if cache is None:
            return None
        routed = routes_itself(session)
    ctx = SessionContext(cache, routed=routed)
    session.__dict__["_sqlacache"] = ctx
    return ctx


def write_context(session: Session, engine: Any) -> SessionContext | None:
    """The context that records this session's writes: its own, or — for a plain session on a
    database some cache reads from — a write-only one, so its commits invalidate that cache too."""
    ctx = context_of(session)
    if ctx is not None:
        return ctx
    existing: SessionContext | None = session.__dict__.get("_sqlacache_writes")
    if existing is not None:
        return existing
    from sqlacache.cache import watchers

    caches = watchers(engine)
    if not caches:
        return None
    ctx = SessionContext(caches[0], reads=False)
    session.__dict__["_sqlacache_writes"] = ctx
    return ctx


def any_context(session: Session) -> SessionContext | None:
    """Whichever context this session already has (reading or write-only)."""
    found: SessionContext | None = session.__dict__.get("_sqlacache") or session.__dict__.get(
        "_sqlacache_writes"
    )
    return found
